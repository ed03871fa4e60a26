"""Localisation table of condrea2024 (Tables II-V) for one experiment and split with box truth.

Rows: the teacher after each refinement round (filtered), the teacher's final pseudo-masks without
and with the size/distance filter, and the student(s); pooled sensitivity / PPV / F1 with 95 %
percentile bootstrap intervals over studies (Pu et al. cluster matching), seconds per study. Below
them the paired differences (bootstrap over the studies both rows scored): round 2 - round 1,
filtered - unfiltered, each student - the final filtered teacher, later students - the first (or, with
--focus NAME, student NAME - every other student).
Needs stage 11 (and 12 for the student row) to have run on the split.

    PE_WORK_DIR=work/demo python bench/bench_localize.py --exp demo_n3 --split test \
        --boxes input/phantom/phantom_test_boxes.csv
    PE_WORK_DIR=work/demo python bench/bench_localize.py --exp demo_n3 --split train \
        --boxes input/phantom/train_boxes.csv --csv reports/localize_train.csv
    PE_WORK_DIR=work/demo python bench/bench_localize.py --exp demo_n3 --split test \
        --boxes input/phantom/phantom_test_boxes.csv \
        --student student=work/demo/localize/demo_n3/student --student long=work/demo/localize/demo_n3/student_long
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pe.io import write_csv_atomic  # noqa: E402
from pe.localize.evaluate import (  # noqa: E402
    format_paired,
    format_report,
    group_rows,
    localization_table,
    paired_rows,
    rows_frame,
)
from pe.localize.teacher_stage import TeacherStageConfig  # noqa: E402


def _none_or_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def _students(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--student wants NAME=DIR, got {item!r}")
        if name.startswith("teacher") or name in out:
            raise SystemExit(f"--student name {name!r} is taken (names are unique and do not start with 'teacher')")
        out[name] = folder
    return out


def _groups(items: list[str]) -> dict[str, list[str]]:
    out = {}
    for item in items:
        name, sep, members = item.partition("=")
        if not sep or not name or not members or name in out:
            raise SystemExit(f"--group wants a new NAME=ROW,ROW,..., got {item!r}")
        out[name] = [m for m in members.split(",") if m]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exp", required=True)
    ap.add_argument("--split", choices=["train", "test"], default="test")
    ap.add_argument("--boxes", required=True, help="box truth CSV (SOPInstanceUID,x,y,width,height) of the split")
    ap.add_argument("--min-voxels", type=_none_or_float, default=100.0, help="size filter at 512 px of the round rows")
    ap.add_argument("--max-dist", type=_none_or_float, default=160.0, help="distance filter at 512 px")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--student", action="append", default=None, metavar="NAME=DIR",
                    help="a stage-12 output folder to score as row NAME (repeatable; default: the stage's own "
                         "folder as 'student'); later students are also compared with the first")
    ap.add_argument("--teacher-out", default=None, metavar="DIR",
                    help="the teacher's stage-11 output folder of the split (default work/localize/<exp>/teacher/<split>; "
                         "e.g. one written with 11_pseudo_masks.py --out)")
    ap.add_argument("--min-score", type=float, nargs="+", default=(), metavar="S",
                    help="also a row per student and S with only its clusters of score_max >= S (its operating "
                         "point swept; the student predicts at --high 0.5 / --low 0.3); these rows are not compared")
    ap.add_argument("--focus", default=None, metavar="NAME",
                    help="compare the student row NAME with every other student (NAME - other) instead of later "
                         "students with the first, e.g. a seed ensemble against each of its members")
    ap.add_argument("--group", action="append", default=None, metavar="NAME=ROW,ROW,...",
                    help="a group of student rows (e.g. one recipe at several seeds; repeatable): each later group is "
                         "compared with the first, member by member (same size: matched seeds) and by the mean of "
                         "the members' pooled scores, paired over the studies all scored")
    ap.add_argument("--csv", default=None, help="also write the rows (estimates and interval bounds) here, "
                                                "and the paired differences to <stem>_paired.csv")
    a = ap.parse_args(argv)
    flt = TeacherStageConfig(min_voxels_512=a.min_voxels, max_dist_512=a.max_dist)
    rows = localization_table(a.exp, a.split, a.boxes, flt, n_boot=a.n_boot, students=_students(a.student),
                              teacher_out=a.teacher_out, min_scores=tuple(a.min_score))
    print(f"localisation of {a.exp} on {a.split} (Pu et al. matching, 95 % bootstrap intervals over studies)")
    print(format_report(rows, n_boot=a.n_boot, focus=a.focus))
    groups = group_rows(rows, _groups(a.group), n_boot=a.n_boot) if a.group else []
    if groups:
        print("\n" + format_paired(groups))
    if a.csv:
        write_csv_atomic(rows_frame(rows), a.csv, index=False)
        pairs = paired_rows(rows, n_boot=a.n_boot, focus=a.focus) + groups
        if pairs:
            out = Path(a.csv)
            write_csv_atomic(rows_frame(pairs), out.with_name(f"{out.stem}_paired.csv"), index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
