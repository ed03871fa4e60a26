"""Stage 02: 3-window JPEG cache of every slice, plus per-study lung boxes and per-slice ROI boxes.

Reads META (the stage-01 metadata parquet: StudyInstanceUID, SOPInstanceUID, path, slice_index, ...)
and the DICOM files it lists. Writes into OUT (CONTRACTS.md, row 02):
``OUT/<StudyInstanceUID>/<slice_index:04d>.jpg`` (R lung, G PE, B mediastinal window; 4:4:4 JPEG),
``OUT/index.parquet``, ``OUT/boxes.csv``, ``OUT/rois.parquet`` (per-slice lungs ∪ heart ROI boxes,
:mod:`pe.anatomy.roi`), ``OUT/errors.csv`` and the per-study parts in ``OUT/_parts/`` and
``OUT/_rois/`` that make the run resumable (a study with a part is skipped unless --force; a complete
study without its ROI part gets only the ROI computed, so re-running adds ROIs to an older cache).

    python src/02_cache_images.py --meta work/meta/train.parquet --out work/cache/jpeg512 \
        [--size 512] [--quality 95] [--workers N] [--shard i/n] [--force] [--no-roi]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pe.data.cache import cache_images, parse_shard


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as e:  # argparse shows ArgumentTypeError messages verbatim
        raise argparse.ArgumentTypeError(str(e)) from e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meta", type=Path, required=True, help="metadata parquet of one split (stage 01)")
    ap.add_argument("--out", type=Path, required=True, help="cache folder (shared by train and test runs)")
    ap.add_argument("--size", type=int, default=512, help="side of the square cached images, pixels")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality (4:4:4 chroma sampling)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (one study each)")
    ap.add_argument("--shard", type=_shard, default=None, help="i/n: only studies of shard i of n")
    ap.add_argument("--force", action="store_true", help="redo studies that are already complete")
    ap.add_argument("--no-roi", action="store_true", help="skip the per-slice ROI boxes (rois.parquet)")
    args = ap.parse_args(argv)
    cache_images(args.meta, args.out, size=args.size, quality=args.quality, workers=args.workers,
                 shard=args.shard, force=args.force, roi=not args.no_roi)
    # A study without any decodable slice is reported in the summary and errors.csv; it does not
    # fail the command, so the other studies (and later stages) go on.
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
