"""Do two benchmark CNNs look at the same place? Grad-CAM of both on the same boxed positive held-out
slices (each study explained by the same fold index of each run): how often the maps' maxima coincide
and each run's pointing game on that sample.

    python bench/compare_cams.py --data input/bench-phantom \
        --run reports/bench-quality/hard-1-conv/runs/cnn-4bb705b016-s0 \
        --run reports/bench-quality/hard-1-conv/runs/cnn-b6ba24dc89-s0 --n 40

The same run twice with ``--weights model --weights train_model`` compares the weights a CNN predicts
with (the EMA weights) with the raw weights the optimiser trained (those the attention loss acted on,
though in training mode there; both are explained in eval mode): whether the EMA's maps are constant
where the raw weights' are not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import pandas as pd  # noqa: E402

from pe.eval.benchmark_report import heldout_boxes, pipeline_env  # noqa: E402
from pe.explain.pointing import map_peak, pointing_game  # noqa: E402
from pe.models.load import CNN_WEIGHTS  # noqa: E402
from pe.report.explain_maps import explain_slices  # noqa: E402
from pe.rspect import SOP, STUDY  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="benchmark data folder (phantom_test_labels.csv, boxes)")
    ap.add_argument("--run", type=Path, action="append", required=True, help="a run folder (give two)")
    ap.add_argument("--exp", default="cnn")
    ap.add_argument("--weights", action="append", choices=CNN_WEIGHTS,
                    help="per --run, in order: the checkpoint's weights (default model: the EMA weights when EMA was on)")
    ap.add_argument("--n", type=int, default=40, help="boxed positive held-out slices, drawn at random")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if len(a.run) != 2:
        ap.error("give --run twice")
    weights = a.weights or ["model", "model"]
    if len(weights) != 2:
        ap.error("give --weights twice (one per --run) or not at all")
    lab = pd.read_csv(a.data / "phantom_test_labels.csv", dtype={SOP: str, STUDY: str})
    pos = lab[lab["pe_present_on_image"] == 1]
    boxes = heldout_boxes(a.data, set(pos[SOP]))
    if boxes is None:
        raise SystemExit(f"{a.data}: no embolus boxes for the held-out positive slices")
    cand = pos[pos[SOP].isin(set(boxes[SOP]))]
    targets = cand.sample(n=min(a.n, len(cand)), random_state=a.seed)[[SOP, STUDY]].assign(prob=1.0)
    studies = sorted(targets[STUDY].unique())
    fold_of = pd.Series([i % 2 for i in range(len(studies))], index=studies)
    maps = []
    for run, w in zip(a.run, weights, strict=True):
        shapes = pd.read_parquet(run / "work" / "meta" / "test.parquet", columns=[SOP, "rows", "columns"]).set_index(SOP)
        with pipeline_env(run, a.data):
            maps.append({s.sop: s for s in explain_slices(a.exp, targets, fold_of, boxes, shapes, weights=w)})
    common = sorted(set(maps[0]) & set(maps[1]))
    peaks = [[map_peak(m[k].cam) for k in common] for m in maps]  # None: a constant map points nowhere
    both = [(p, q) for p, q in zip(*peaks, strict=True) if p is not None and q is not None]
    print(f"{len(common)} slices: Grad-CAM maxima at the same pixel on {sum(p == q for p, q in both)} "
          f"of the {len(both)} where neither map is constant")
    for run, w, m in zip(a.run, weights, maps, strict=True):
        boxed = [m[k] for k in common if m[k].boxes is not None and len(m[k].boxes)]
        r = pointing_game([s.cam for s in boxed], [s.boxes for s in boxed])
        print(f"{run.name} ({w}): pointing game {r.hits}/{r.n} (chance {r.chance:.4f}), {r.constant} constant maps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
