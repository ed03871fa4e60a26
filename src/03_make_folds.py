"""Stage 03: split the training studies into K stratified folds, once, for every later stage.

Reads  --meta   the train metadata parquet of stage 01 (one row per image, with train.csv labels)
Writes --out    FOLDS.csv (StudyInstanceUID, fold), one row per study; prints studies per fold/stratum

    python src/03_make_folds.py --meta work/meta/train.parquet --out work/folds.csv --n-folds 5 --seed 42
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from pe.data.folds import check_folds, make_folds, merge_small_strata, study_strata
from pe.io import write_csv_atomic


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meta", type=Path, required=True, help="train metadata parquet (stage 01)")
    ap.add_argument("--out", type=Path, required=True, help="folds CSV to write")
    ap.add_argument("--n-folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)

    if not args.meta.is_file():
        ap.error(f"{args.meta}: metadata file not found")
    meta = pd.read_parquet(args.meta)
    folds = make_folds(meta, n_folds=args.n_folds, seed=args.seed)
    check_folds(folds, meta)
    write_csv_atomic(folds, args.out)

    strata = merge_small_strata(study_strata(meta), args.n_folds).rename("stratum")
    table = pd.crosstab(folds.set_index("StudyInstanceUID")["fold"], strata)
    print(table.to_string())
    print(f"wrote {args.out}: {len(folds)} studies in {args.n_folds} folds (seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
