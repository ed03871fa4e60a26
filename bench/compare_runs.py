"""Paired comparison across quality-benchmark output folders that share their held-out studies.

    python bench/compare_runs.py --truth input/bench-phantom/phantom_test_labels.csv \
        --side plain_ord=reports/bench-quality/hard-1-conv:baseline \
        --side plain_sc=reports/bench-quality/shortcut-3:baseline \
        --side att_ord=reports/bench-quality/hard-1-conv:attention \
        --side att_sc=reports/bench-quality/shortcut-3:attention \
        --contrast plain_sc-plain_ord --contrast att_sc-att_ord \
        --contrast att_sc-att_ord-plain_sc+plain_ord [--seeds 0 1] [--json OUT.json]

Each ``--side NAME=OUT_DIR:VARIANT`` is a variant of a finished ``bench/bench_quality.py --out OUT_DIR``
run; each ``--contrast`` a signed sum of sides. Printed: every side's metric, study PE AUC, image AUC
and CNN slice AUC (mean over seeds) and every contrast, with 95 % bootstrap intervals over the
held-out studies, paired (one resample for all sides and seeds). Its use in the README: shi2020's
shortcut ablation (the ordinary benchmark phantom vs its ``--shortcut-rate`` twin, same test split).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pe.eval import benchmark as bm  # noqa: E402
from pe.eval.benchmark_compare import compare, format_comparison, parse_side  # noqa: E402
from pe.io import write_json_atomic  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--truth", type=Path, required=True, help="labelled held-out split shared by every side")
    ap.add_argument("--side", action="append", required=True, help="NAME=OUT_DIR[:VARIANT] (repeat)")
    ap.add_argument("--contrast", action="append", default=[], help="e.g. a-b or a-b-c+d (repeat)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds present on every side")
    ap.add_argument("--cnn-override", nargs="*", default=[], help="as given to bench_quality.py")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    try:
        sides = [parse_side(s) for s in args.side]
        r = compare(args.truth, sides, args.contrast, args.seeds, args.n_boot, args.cnn_override)
    except (bm.BenchError, OSError) as e:
        print(f"compare_runs: {e}", file=sys.stderr)
        return 2
    print(format_comparison(r))
    if args.json:
        write_json_atomic(args.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
