"""Stage 13 (runs before 04): anatomically aware pretraining of the slice CNN on landmark regression
(papers/condrea2023_anatomically_aware_dual_hop.txt; pe.train.landmarks). The PE CNN then starts from
it with ``init_from=<name>`` in its config or on 04's command line.

Reads  the CNN config YAML (+ key=value overrides; the same backbone, neighbours, input size and crop
       as the PE CNN), the train metadata and JPEG cache it names, and a landmark CSV
       (StudyInstanceUID, landmark, x, y, slice_index, present; default: the data folder's
       phantom_landmarks.csv)
Writes work/models/<name>/{config.yaml, metrics.jsonl, last.pt, backbone.pt, summary.json}

    python src/13_pretrain_landmarks.py --config src/configs/demo.yaml name=landmarks epochs=4
    python src/04_train_cnn.py --config src/configs/demo.yaml --fold 0 init_from=landmarks

Real data has no landmark truth: ``--find-landmarks OUT.csv`` first derives the landmarks a classical
method can see (lung apices and bases, carina, heart centre: pe.anatomy.landmarks.find_landmarks on
the lung/heart/airway masks of each study's HU volume read from its DICOMs), at most
``--max-studies`` studies, and writes them in the same columns; a study whose files cannot be read
is logged and skipped. Then pass that file as ``--landmarks``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pe import paths
from pe.config import CNNConfig, load_config
from pe.rspect import STUDY


def find_landmarks_csv(meta_path: Path, out: Path, max_studies: int = 0) -> int:
    """The classical finder over the studies of ``meta_path`` into ``out``; returns studies written."""
    from pe.anatomy.landmarks import find_landmarks
    from pe.anatomy.masks import masks_for_study
    from pe.data.dicom import read_hu
    from pe.io import write_csv_atomic

    meta = pd.read_parquet(meta_path).sort_values([STUDY, "slice_index"])
    rows, done = [], 0
    studies = list(meta.groupby(STUDY, sort=True))
    if max_studies > 0:
        studies = studies[:max_studies]
    for study, g in tqdm(studies, desc="landmarks", unit="study", disable=None):
        try:
            vol = np.stack([read_hu(p) for p in g["path"]])
        except (OSError, ValueError) as e:
            print(f"skipped study {study}: {e}", file=sys.stderr, flush=True)
            continue
        found = find_landmarks(masks_for_study(vol, float(g["pixel_spacing_col"].iloc[0])))
        for name, pt in found.items():
            if pt is not None:
                rows.append({STUDY: study, "landmark": name, "x": pt[0], "y": pt[1], "slice_index": pt[2],
                             "present": 1})
        done += 1
    write_csv_atomic(pd.DataFrame(rows, columns=[STUDY, "landmark", "x", "y", "slice_index", "present"]), out)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="CNN experiment YAML (its backbone/input are pretrained)")
    ap.add_argument("--landmarks", type=Path, help="landmark CSV (default: DATA/phantom_landmarks.csv)")
    ap.add_argument("--find-landmarks", type=Path, metavar="OUT.csv",
                    help="derive landmarks from the DICOMs with the classical finder, write OUT.csv and stop")
    ap.add_argument("--max-studies", type=int, default=0, help="with --find-landmarks: at most N studies")
    ap.add_argument("--val-frac", type=float, default=0.2, help="share of studies held out to measure the error")
    ap.add_argument("--stride", type=int, default=2, help="every Nth slice of each study is a sample")
    ap.add_argument("--restart", action="store_true", help="ignore last.pt and start again")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (name=landmarks epochs=4 ...)")
    args = ap.parse_args(argv)
    cfg = load_config(CNNConfig, args.config, args.overrides)
    if args.find_landmarks:
        meta = Path(cfg.meta_train) if cfg.meta_train else paths.meta_path("train")
        n = find_landmarks_csv(meta, args.find_landmarks, args.max_studies)
        print(f"landmarks of {n} studies written to {args.find_landmarks}", flush=True)
        return 0
    from pe.train.landmarks import pretrain_landmarks

    lm = args.landmarks or paths.data_dir() / "phantom_landmarks.csv"
    summary = pretrain_landmarks(cfg, lm, args.val_frac, args.stride, resume=not args.restart)
    print({k: round(v, 5) if isinstance(v, float) else v for k, v in summary.items()}, flush=True)
    print(f"backbone: {paths.models_dir() / cfg.name / 'backbone.pt'} (use init_from={cfg.name})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
