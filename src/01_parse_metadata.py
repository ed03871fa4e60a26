"""Stage 01: the metadata table of one split, from the DICOM headers only (see src/pe/data/metadata.py).

Reads DIR/<split>/<study>/<series>/<sop>.dcm and DIR/<split>.csv. Writes (CONTRACTS.md row 01)
META.parquet: one row per image with StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, path, z,
slice_index (0..n-1 by ascending z), n_slices, rows, columns, pixel_spacing_row/col,
slice_thickness, rescale_slope/intercept, transfer_syntax (+ every train.csv column for train),
sorted by study then slice_index; and META.problems.csv (file, StudyInstanceUID, problem, detail).
Problems are reported, never fatal; a summary line is printed.

    python src/01_parse_metadata.py --data-dir input/phantom --split train --out work/meta/train.parquet
"""

from __future__ import annotations

import argparse
import os
import time

from pe.data.metadata import SPLITS, parse_metadata


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="data root: train/, test/, train.csv, test.csv")
    ap.add_argument("--split", required=True, choices=SPLITS)
    ap.add_argument("--out", required=True, help="output parquet; problems go to <stem>.problems.csv beside it")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    t0 = time.time()
    meta = parse_metadata(args.data_dir, args.split, args.out, workers=args.workers)
    print(f"wrote {args.out}: {len(meta)} rows in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
