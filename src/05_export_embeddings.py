"""Stage 05: out-of-fold per-slice CNN embeddings for the sequence stage.

Reads  work/models/<exp>/fold<k>/best.pt (stage 04), the JPEG cache named in its config,
       work/folds.csv (train split) and work/meta/<split>.parquet.
Writes work/embeddings/<exp>/fold<k>/<split>/<StudyInstanceUID>.npy (float16, slices in z order × D),
       .../<split>/parts/<StudyInstanceUID>.parquet and .../<split>/index.parquet
       (StudyInstanceUID, SOPInstanceUID, slice_index, prob).
Train split: fold k's model embeds only fold k's (validation) studies; test split: every test study.
Resumable: studies already exported are skipped.

    python src/05_export_embeddings.py --exp demo --split train
    python src/05_export_embeddings.py --exp demo --split test --fold 0
"""

from __future__ import annotations

import argparse

from pe.infer.embeddings import export_embeddings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exp", required=True, help="stage-1 experiment name (work/models/<exp>/)")
    ap.add_argument("--fold", type=int, default=None, help="one fold (default: every fold with a best.pt)")
    ap.add_argument("--split", choices=["train", "test"], default="train")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    export_embeddings(args.exp, args.split, folds=None if args.fold is None else [args.fold],
                      device=args.device, batch_size=args.batch_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
