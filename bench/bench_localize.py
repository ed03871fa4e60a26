"""Localisation table of condrea2024 (Tables II-V) for one experiment and split with box truth.

Rows: the teacher after each refinement round (filtered), the teacher's final pseudo-masks without
and with the size/distance filter, and the student; pooled sensitivity / PPV / F1 with 95 %
percentile bootstrap intervals over studies (Pu et al. cluster matching), seconds per study.
Needs stage 11 (and 12 for the student row) to have run on the split.

    PE_WORK_DIR=work/demo python bench/bench_localize.py --exp demo_n3 --split test \
        --boxes input/phantom/phantom_test_boxes.csv
    PE_WORK_DIR=work/demo python bench/bench_localize.py --exp demo_n3 --split train \
        --boxes input/phantom/train_boxes.csv --csv reports/localize_train.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pe.io import write_csv_atomic  # noqa: E402
from pe.localize.evaluate import format_table, localization_table, rows_frame  # noqa: E402
from pe.localize.teacher_stage import TeacherStageConfig  # noqa: E402


def _none_or_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exp", required=True)
    ap.add_argument("--split", choices=["train", "test"], default="test")
    ap.add_argument("--boxes", required=True, help="box truth CSV (SOPInstanceUID,x,y,width,height) of the split")
    ap.add_argument("--min-voxels", type=_none_or_float, default=100.0, help="size filter at 512 px of the round rows")
    ap.add_argument("--max-dist", type=_none_or_float, default=160.0, help="distance filter at 512 px")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--csv", default=None, help="also write the rows (estimates and interval bounds) here")
    a = ap.parse_args(argv)
    flt = TeacherStageConfig(min_voxels_512=a.min_voxels, max_dist_512=a.max_dist)
    rows = localization_table(a.exp, a.split, a.boxes, flt, n_boot=a.n_boot)
    print(f"localisation of {a.exp} on {a.split} (Pu et al. matching, 95 % bootstrap intervals over studies)")
    print(format_table(rows))
    if a.csv:
        write_csv_atomic(rows_frame(rows), a.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
