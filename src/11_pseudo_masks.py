"""Stage 11: explainability teacher → per-study 3D pseudo-masks (condrea2024 stage 2).

Reads  work/models/<exp>/fold<k>/best.pt (stage 04: on train each study's out-of-fold model, on
       test the mean logit of every fold model), the JPEG cache named in its config (stage 02),
       its folds.csv and work/meta/<split>.parquet (stage 01).
Writes work/localize/<exp>/teacher/<split>/{masks,iters}/parts/<StudyInstanceUID>.parquet,
       .../masks/index.parquet, .../clusters.csv (3D clusters with a score per study),
       .../timings.csv. Resumable: finished studies are skipped. With ``--export-png DIR`` also
       DIR/<SOPInstanceUID>.png (255 = pseudo-embolus, original size) for every slice with a voxel:
       the attention loss's mask folder (``04_train_cnn.py ... attention_lambda=1 attention_source=DIR``).

    python src/11_pseudo_masks.py --exp demo_n3 --split train
    python src/11_pseudo_masks.py --exp demo_n3 --split test --ig-steps 32 --max-iter 10
    python src/11_pseudo_masks.py --exp demo_n3 --split train --gate-labels --out work/localize/demo_n3/gated/train
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from pe import paths
from pe.localize.pseudo_io import PseudoMaskStore, export_masks_png
from pe.localize.teacher import TeacherConfig
from pe.localize.teacher_stage import TeacherStageConfig, run_teacher, sensitivity_threshold


def _none_or_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exp", required=True, help="stage-04 experiment name (work/models/<exp>/)")
    ap.add_argument("--split", choices=["train", "test"], default="train")
    ap.add_argument("--out", default=None, help="output folder (default work/localize/<exp>/teacher/<split>)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-studies", type=int, default=None, help="first N studies only (smoke runs)")
    ap.add_argument("--clf-threshold", type=float, default=0.5, help="window probability that counts as positive")
    ap.add_argument("--clf-sensitivity", type=float, default=None, metavar="S",
                    help="instead of --clf-threshold: the paper's high-sensitivity operating point, the threshold "
                         "that calls S (e.g. 0.95) of the positive training slices positive in the CNN's "
                         "out-of-fold probabilities")
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--n-references", type=int, default=1, help="IG references (k > 1 adds noisy ones)")
    ap.add_argument("--smoothgrad-samples", type=int, default=0)
    ap.add_argument("--high", type=float, default=0.5, help="hysteresis seed threshold (fraction of the peak)")
    ap.add_argument("--low", type=float, default=0.2, help="hysteresis join threshold (fraction of the peak)")
    ap.add_argument("--max-iter", type=int, default=10, help="refinement rounds per window")
    ap.add_argument("--min-new-voxels", type=int, default=50, help="stop a window when a round finds fewer")
    ap.add_argument("--agg-threshold", type=float, default=0.4, help="Gaussian-weighted vote a voxel needs")
    ap.add_argument("--min-voxels", type=_none_or_float, default=100.0,
                    help="size filter at 512 px (scaled by (S/512)^2; 'none' = off)")
    ap.add_argument("--max-dist", type=_none_or_float, default=160.0,
                    help="distance filter at 512 px from the image centre (scaled by S/512; 'none' = off)")
    ap.add_argument("--gate-labels", action="store_true",
                    help="train split: explain only windows on slices labelled positive (pe_present_on_image) "
                         "and keep no pseudo-voxel on a slice labelled negative (label gating; give --out so "
                         "the ungated masks are not mixed with these)")
    ap.add_argument("--export-png", type=Path, metavar="DIR",
                    help="also write the pseudo-masks as DIR/<SOPInstanceUID>.png at the original size: the "
                         "mask-folder input of the attention loss (attention_source=DIR)")
    a = ap.parse_args(argv)
    if a.clf_sensitivity is not None:
        a.clf_threshold, op = sensitivity_threshold(a.exp, a.clf_sensitivity)
        print("operating point: threshold {threshold:.4f} for target sensitivity {target_sensitivity:.2f}: "
              "out-of-fold slice sensitivity {slice_sensitivity:.3f}, specificity {slice_specificity:.3f} "
              "({positive_slices} positive / {negative_slices} negative slices)".format(**op), flush=True)
    teacher = TeacherConfig(clf_threshold=a.clf_threshold, ig_steps=a.ig_steps, n_references=a.n_references,
                            smoothgrad_samples=a.smoothgrad_samples, high=a.high, low=a.low, max_iter=a.max_iter,
                            min_new_voxels=a.min_new_voxels, agg_threshold=a.agg_threshold)
    cfg = TeacherStageConfig(teacher=teacher, min_voxels_512=a.min_voxels, max_dist_512=a.max_dist,
                             max_studies=a.max_studies, device=a.device, gate_labels=a.gate_labels)
    out = run_teacher(a.exp, a.split, cfg, out=a.out)
    print(f"pseudo-masks: {out}")
    if a.export_png:
        meta = pd.read_parquet(paths.meta_path(a.split), columns=["SOPInstanceUID", "rows", "columns"])
        shapes = {str(r.SOPInstanceUID): (int(r.rows), int(r.columns)) for r in meta.itertuples(index=False)}
        counts = export_masks_png(PseudoMaskStore(out / "masks"), a.export_png, shapes)
        print(f"mask PNGs: {counts['written']} slices of {counts['studies']} studies in {a.export_png} "
              f"({counts['skipped']} skipped: no valid SOPInstanceUID or no metadata row)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
