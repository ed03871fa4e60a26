"""Stage 12: the 3D segmentation student on the teacher's pseudo-masks (condrea2024 stage 3).

Reads  work/localize/<exp>/teacher/train/masks (stage 11; with --train-boxes CSV the box truth of the
       train split instead: the oracle student), the JPEG cache and metadata of the stage-04
       experiment <exp>.
Writes work/localize/<exp>/student/model.pt (reused unless --retrain) and, per split,
       work/localize/<exp>/student/<split>/masks/ (predicted clusters, resumable per study),
       .../clusters.csv (3D clusters with a score per study) and .../timings.csv; predicted_with.json
       records the model(s) (model.pt hash) and cluster settings behind the predictions, which are redone
       when either changes. With --average DIR ... (a seed ensemble of trained students) it trains nothing,
       writes no model.pt and predicted_with.json lists the members.
With --boxes (box truth of the last split, e.g. the phantom's phantom_test_boxes.csv) it prints the
localisation table of teacher and student (bench/bench_localize.py prints the same).

    python src/12_train_student.py --exp demo_n3 --splits test
    python src/12_train_student.py --exp demo_n3 --splits test --boxes input/phantom/phantom_test_boxes.csv
    python src/12_train_student.py --exp demo_n3 --train-boxes input/phantom/train_boxes.csv \
        --out work/demo/localize/demo_n3/student_oracle
    python src/12_train_student.py --exp demo_n3 --out work/demo/localize/demo_n3/student_ens \
        --average work/demo/localize/demo_n3/student work/demo/localize/demo_n3/student_seed1
"""

from __future__ import annotations

import argparse

import torch

from pe.localize.student import StudentConfig
from pe.localize.student_stage import StudentStageConfig, run_student
from pe.models.seg3d import Seg3DConfig


def _none_or_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


DEFAULT = "default"


def _prior(text: str) -> float | str | None:
    return text if text == DEFAULT else _none_or_float(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exp", required=True, help="stage-04/11 experiment name")
    ap.add_argument("--splits", nargs="+", choices=["train", "test"], default=["test"], help="splits to predict")
    ap.add_argument("--out", default=None, help="output folder (default work/localize/<exp>/student)")
    ap.add_argument("--retrain", action="store_true", help="train again even when model.pt exists")
    ap.add_argument("--max-studies", type=int, default=None, help="first N studies of each split to predict (smoke runs); training uses every study stage 11 labelled")
    ap.add_argument("--crop", type=int, nargs=3, default=[16, 64, 64], metavar=("Z", "Y", "X"),
                    help="training crop and sliding window (paper: 64 128 128)")
    ap.add_argument("--filters", type=int, nargs="+", default=[8, 16, 32], help="DynUNet filters per level (3 levels)")
    # 1,200 since 2026-12-07 (session 23, planned in advance, docs/benchmark-runs.md): on the full default-benchmark
    # splits 1,200 iterations beat 300 on both CNNs tried (F1 +0.104 and +0.040, paired intervals above 0).
    ap.add_argument("--iterations", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--loss", choices=["gdl", "gdl_ce"], default="gdl_ce")
    ap.add_argument("--mixup-alpha", type=float, default=0.4, help="Beta(a, a) mixup weight; 0 = off")
    ap.add_argument("--pos-fraction", type=float, default=0.5, help="share of crops centred on a pseudo-mask voxel")
    ap.add_argument("--prior", type=_prior, default=DEFAULT,
                    help=f"start a fresh network predicting PE with this probability everywhere (the output layer's "
                         f"prior initialisation; default {StudentConfig.prior} since session 26, none with --init; "
                         f"'none' = MONAI's seed-dependent start)")
    ap.add_argument("--high", type=float, default=0.5, help="hysteresis seed threshold on the PE probability")
    ap.add_argument("--low", type=float, default=0.3)
    ap.add_argument("--min-voxels", type=_none_or_float, default=100.0, help="size filter at 512 px ('none' = off)")
    ap.add_argument("--max-dist", type=_none_or_float, default=160.0, help="distance filter at 512 px ('none' = off)")
    ap.add_argument("--cache-dir", default=None, help="JPEG cache (default: the one of the stage-04 config of --exp)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-boxes", default=None, metavar="CSV",
                    help="train on this box truth of the train split instead of the teacher's pseudo-masks "
                         "(the oracle student; use its own --out)")
    ap.add_argument("--teacher-out", default=None, metavar="DIR",
                    help="learn from this stage-11 output of the train split (11_pseudo_masks.py --out DIR) instead "
                         "of work/localize/<exp>/teacher/train")
    ap.add_argument("--init", default=None, metavar="MODEL_PT",
                    help="fine-tune: start from this trained student (a stage-12 model.pt with the same --filters), "
                         "e.g. a pseudo-label student fine-tuned on box truth (condrea2024 Table VI)")
    ap.add_argument("--train-studies", type=int, default=None, metavar="N",
                    help="train on the first N training studies (sorted ids) only, e.g. the quarter with human masks")
    ap.add_argument("--average", nargs="+", default=None, metavar="DIR",
                    help="a seed ensemble: train nothing, predict with the mean PE probability of these trained "
                         "students (stage-12 output folders, e.g. one recipe at several --seed); give it its own --out")
    ap.add_argument("--boxes", default=None, help="box truth CSV of the last split: print the localisation table")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    # the default prior is for a fresh network; a fine-tuned one (--init) starts from its given weights
    prior = (None if a.init else StudentConfig.prior) if a.prior == DEFAULT else a.prior
    student = StudentConfig(crop_zyx=tuple(a.crop), batch_size=a.batch_size, iterations=a.iterations, lr=a.lr,
                            warmup=max(1, a.iterations // 15), loss=a.loss, pos_fraction=a.pos_fraction,
                            mixup_alpha=a.mixup_alpha, prior=prior,
                            high=a.high, low=a.low, seed=a.seed, device=a.device)
    seg = Seg3DConfig(filters=tuple(a.filters))
    cfg = StudentStageConfig(student=student, seg=seg, min_voxels_512=a.min_voxels, max_dist_512=a.max_dist,
                             max_studies=a.max_studies, retrain=a.retrain,
                             cache_dir=a.cache_dir, train_boxes=a.train_boxes,
                             teacher_out=a.teacher_out, init_from=a.init, train_studies=a.train_studies,
                             average=tuple(a.average) if a.average else None)
    out = run_student(a.exp, tuple(a.splits), cfg, out=a.out)
    print(f"student: {out}")
    if a.boxes:
        from pe.localize.evaluate import format_report, localization_table
        from pe.localize.teacher_stage import TeacherStageConfig

        flt = TeacherStageConfig(min_voxels_512=a.min_voxels, max_dist_512=a.max_dist)
        print(format_report(localization_table(a.exp, a.splits[-1], a.boxes, flt, students={"student": out})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
