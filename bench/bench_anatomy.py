"""Anatomical masks and landmarks on a phantom: the classical method of pe.anatomy against the truth.

Makes a small phantom (or reads ``--data``), reads every training study's DICOMs in pipeline order
(ascending z), runs :func:`pe.anatomy.masks.masks_for_study` and prints: mask IoU (lungs, heart, ROI)
and per-slice ROI box IoU against ``phantom_anatomy.csv``/the redrawn truth; the share of embolus boxes
(train_boxes.csv) inside the ROI crop, by vessel level; the crop's area as a share of the image (the
paper: 34 % of the volume); the classical landmark error in mm; the masking time per slice. The same figures for the boxes stage 02
ships (:class:`pe.anatomy.roi.RoiAccumulator`: the masker on a ~``--grid`` px grid, every ``--every``-th
slice, the others interpolated, ``ROI_MARGIN``), as "stage-02 ROI" lines.

    python bench/bench_anatomy.py --studies 8 --size 256 [--grid 64] [--every 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pe.anatomy import landmarks as lm  # noqa: E402
from pe.anatomy import masks as am  # noqa: E402
from pe.anatomy import roi as ar  # noqa: E402
from pe.data.dicom import read_dataset, read_hu  # noqa: E402
from pe.synthetic import anatomy_truth as at  # noqa: E402
from pe.synthetic.phantom import StudyPlan, make_phantom  # noqa: E402


def study_volume(data: Path, plan: StudyPlan) -> np.ndarray:
    """(n, H, W) HU of a phantom study in pipeline order (ascending z), read from its DICOMs."""
    folder = data / plan.split / plan.study / plan.series
    files = sorted(folder.glob("*.dcm"), key=lambda f: float(read_dataset(f).ImagePositionPatient[2]))
    return np.stack([read_hu(f) for f in files]).astype(np.float32)


def embolus_levels(plan: StudyPlan) -> dict[str, list[str]]:
    """SOP -> vessel level of each of its train_boxes.csv rows, in row order (phantom._draw_emboli)."""
    out: dict[str, list[str]] = defaultdict(list)
    for k in range(plan.n):
        for e in plan.emboli:
            if e.style != "aortic" and k in e.slices:
                out[plan.sops[k]].append(plan.tubes[e.tube].level)
    return out


def _inside(box: tuple[int, int, int, int] | None, x: int, y: int, w: int, h: int) -> bool:
    return box is not None and box[0] <= x and box[1] <= y and x + w <= box[2] and y + h <= box[3]


def shipped_boxes(vol: np.ndarray, spacing: float, grid: int, every: int,
                  margin: float = ar.ROI_MARGIN) -> tuple[dict, float]:
    """Stage 02's boxes per crop mode (pixels of the volume's own size) and the CPU seconds they took
    (process time: what they add to a stage-02 worker, whatever the machine's load)."""
    t0 = time.process_time()
    acc = ar.RoiAccumulator(len(vol), vol.shape[1], vol.shape[2], spacing, grid=grid, every=every)
    for k, hu in enumerate(vol):
        acc.add(k, hu)
    b, found = acc.boxes(vol.shape[2], margin)
    secs = time.process_time() - t0
    return {mode: [tuple(int(v) for v in r) for r in ar.crop_boxes(b, found, mode)] for mode in ar.ROI_MODES}, secs


def evaluate_study(data: Path, plan: StudyPlan, boxes: pd.DataFrame, lmk: pd.DataFrame,
                   grid: int = ar.ROI_GRID, every: int = ar.ROI_EVERY, margin: float = ar.ROI_MARGIN) -> dict:
    vol = study_volume(data, plan)
    fast, res_fast_secs = shipped_boxes(vol, plan.pixel_spacing, grid, every, margin)
    t0 = time.perf_counter()
    m = am.masks_for_study(vol, plan.pixel_spacing)
    secs = time.perf_counter() - t0
    truth = [at.truth_masks(plan, k) for k in range(plan.n - 1, -1, -1)]  # pipeline order
    t_lung = np.stack([a for a, _ in truth])
    t_heart = np.stack([b for _, b in truth])
    t_roi = np.stack([am.hull_mask(a | b) for a, b in truth])
    res: dict = {"lung_iou": am.mask_iou(m.lungs, t_lung), "heart_iou": am.mask_iou(m.heart, t_heart),
                 "roi_iou": am.mask_iou(m.roi, t_roi), "secs": secs, "n": plan.n}
    t_boxes = am.roi_boxes(t_roi, "slice")
    res["roi_box_iou"] = [am.box_iou(a, b) for a, b in zip(m.roi_boxes("slice"), t_boxes, strict=True)
                          if a is not None or b is not None]
    res["fast_box_iou"] = [am.box_iou(a, b) for a, b in zip(fast["slice"], t_boxes, strict=True) if b is not None]
    res["fast_secs"] = res_fast_secs
    area = vol.shape[1] * vol.shape[2]
    res["crop_share"] = {mode: [0.0 if b is None else (b[2] - b[0]) * (b[3] - b[1]) / area
                                for b in m.roi_boxes(mode)] for mode in ("slice", "slab", "study")}
    res["fast_share"] = {mode: [(b[2] - b[0]) * (b[3] - b[1]) / area for b in fast[mode]] for mode in ar.ROI_MODES}
    sop_slice = {s: plan.n - 1 - k for k, s in enumerate(plan.sops)}
    levels = embolus_levels(plan)
    cover: list[tuple[str, dict[str, bool]]] = []
    mode_boxes = {mode: m.roi_boxes(mode) for mode in ("slice", "slab", "study")}
    for sop, g in boxes[boxes["SOPInstanceUID"].isin(sop_slice)].groupby("SOPInstanceUID", sort=False):
        i = sop_slice[sop]
        for (_, r), level in zip(g.iterrows(), levels[sop], strict=True):
            x, y, w, h = int(r.x), int(r.y), int(r.width), int(r.height)
            flags = {mode: _inside(b[i], x, y, w, h) for mode, b in mode_boxes.items()}
            flags.update({f"stage02_{mode}": _inside(b[i], x, y, w, h) for mode, b in fast.items()})
            flags["centre_in_mask"] = bool(m.roi[i, min(y + h // 2, area - 1), x + w // 2])
            cover.append((level, flags))
    res["cover"] = cover
    truth_pts = {r.landmark: (r.x, r.y, r.slice_index) for r in lmk.itertuples() if r.present}
    found = lm.find_landmarks(m)
    res["lm_err"] = lm.landmark_errors_mm(found, truth_pts, plan.pixel_spacing, plan.slice_spacing)
    return res


def _q(vals: list[float]) -> str:
    a = np.asarray(vals, dtype=float)
    return f"mean {a.mean():.3f}  min {a.min():.3f}  p10 {np.quantile(a, 0.1):.3f}" if len(a) else "n/a"


def report(results: list[dict]) -> None:
    print(f"studies {len(results)}, slices {sum(r['n'] for r in results)}")
    for key in ("lung_iou", "heart_iou", "roi_iou"):
        print(f"{key:12s} per study: {_q([r[key] for r in results])}")
    print(f"roi box IoU per slice: {_q([v for r in results for v in r['roi_box_iou']])}")
    for mode in ("slice", "slab", "study"):
        print(f"crop area share ({mode:5s} box): {_q([v for r in results for v in r['crop_share'][mode]])}")
    by_level: dict[str, list[dict[str, bool]]] = defaultdict(list)
    for r in results:
        for level, flags in r["cover"]:
            by_level[level].append(flags)
    for level in sorted(by_level):
        f = by_level[level]
        cells = "  ".join(f"{k} {100 * np.mean([x[k] for x in f]):.1f}%" for k in f[0])
        print(f"emboli {level:9s} n={len(f):4d}: inside ROI {cells}")
    errs: dict[str, list[float]] = defaultdict(list)
    for r in results:
        for k, v in r["lm_err"].items():
            errs[k].append(v)
    for k in sorted(errs):
        print(f"landmark {k:16s} n={len(errs[k]):3d}  error mm: median {np.median(errs[k]):6.1f}  "
              f"max {np.max(errs[k]):6.1f}")
    n = max(1, sum(r["n"] for r in results))
    print(f"masks_for_study: {1000 * sum(r['secs'] for r in results) / n:.1f} ms per slice")
    print(f"stage-02 ROI box IoU vs truth per slice (slices with a true ROI): "
          f"{_q([v for r in results for v in r['fast_box_iou']])}")
    for mode in ar.ROI_MODES:
        print(f"stage-02 ROI crop area share ({mode:5s} box): {_q([v for r in results for v in r['fast_share'][mode]])}")
    print(f"stage-02 ROI (RoiAccumulator, from HU): {1000 * sum(r['fast_secs'] for r in results) / n:.2f} CPU ms per slice")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="an existing phantom (default: make one in a temp folder)")
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", type=int, default=ar.ROI_GRID, help="stage-02 ROI masker grid, pixels")
    ap.add_argument("--every", type=int, default=ar.ROI_EVERY, help="stage-02 ROI: mask every k-th slice")
    ap.add_argument("--margin", type=float, default=ar.ROI_MARGIN, help="stage-02 ROI margin, share of the side")
    ap.add_argument("--positive-rate", type=float, default=0.6, help="positive exams (more emboli to cover)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "phantom"
            make_phantom(data, train_studies=args.studies, test_studies=0, seed=args.seed, size=args.size,
                         min_slices=40, max_slices=80, positive_rate=args.positive_rate)
        plans = at.load_plans(data)
        boxes = pd.read_csv(data / "train_boxes.csv", dtype={"SOPInstanceUID": str})
        lmk = pd.read_csv(data / at.LANDMARKS_FILE, dtype={"StudyInstanceUID": str})
        results = [evaluate_study(data, p, boxes, lmk[lmk["StudyInstanceUID"] == p.study], args.grid, args.every,
                                  args.margin)
                   for p in plans.values() if p.split == "train"]
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
