"""Anatomical truth of the phantom: per-slice lung / heart / ROI masks and boxes, and landmarks.

Derived from the very geometry the phantom draws with (its own drawing functions on a blank canvas),
so the truth cannot drift from the images. Written by :func:`pe.synthetic.phantom.make_phantom` as two
extra files (the existing outputs are unchanged):

- ``phantom_anatomy.csv``, one row per slice: StudyInstanceUID, SOPInstanceUID, split, slice_index
  (pipeline order: ascending z, 0 = lowest), z (mm), ``lung_x0, lung_y0, lung_x1, lung_y1``,
  ``heart_*``, ``roi_*`` boxes (pixels, x1/y1 exclusive; -1 when empty) and ``lung_area``,
  ``heart_area``, ``roi_area`` (pixels).
- ``phantom_landmarks.csv``, one row per study and landmark (:data:`LANDMARKS`): StudyInstanceUID,
  split, landmark, x, y (pixels, float), slice_index (float, pipeline order), z (mm), present (1 when
  the landmark lies within the study's slices, half a slice of tolerance at each end).

Definitions (t: the phantom's craniocaudal coordinate, 0 = lung apex): lungs = both lung ellipses
minus whatever is drawn over them except intrapulmonary vessels (mediastinum, airway, heart, trunk,
main pulmonary arteries, aorta); heart = myocardium ellipse and left atrium; ROI = convex hull of
lungs ∪ heart (the rule of :mod:`pe.anatomy.masks`). Masks are not stored (they would dwarf the
DICOMs): :func:`truth_masks` redraws them from the study plan (:func:`load_plans`) in ~1 ms.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from pe import io as pe_io
from pe.anatomy.landmarks import LANDMARKS
from pe.anatomy.masks import hull_mask, mask_box
from pe.synthetic import phantom_draw as ph_draw
from pe.synthetic import phantom_plan as ph

ANATOMY_FILE = "phantom_anatomy.csv"
LANDMARKS_FILE = "phantom_landmarks.csv"
_OCCLUDING_TUBES = ("trunk", "main", "aorta")  # drawn over the lungs and not part of them
_LUNG_VISIBLE = 0.08  # _lung_ellipse draws a lung while its size factor is at least this


def _blank(plan: ph.StudyPlan) -> ph_draw._Canvas:
    cv = ph_draw._Canvas(plan.size, plan.pixel_spacing, plan.body["cy"])
    cv.img[:] = np.nan  # drawn pixels become finite: the mask of what a function draws
    return cv


def truth_masks(plan: ph.StudyPlan, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(lungs, heart) bool masks of anatomical slice ``k`` (apex first, as the phantom counts)."""
    t = float(plan.t[k])
    cv = _blank(plan)
    lung = ph_draw._draw_lungs(cv, plan, t)
    heart_cv = _blank(plan)
    ph_draw._draw_heart(heart_cv, plan, t)
    heart = np.isfinite(heart_cv.img)
    occ = _blank(plan)
    ph_draw._draw_mediastinum(occ, plan, t)
    for tb in plan.tubes:
        if tb.level in _OCCLUDING_TUBES and tb.t0 <= t <= tb.t1:
            if tb.kind == "disk":
                occ.circle(*tb.at(t), 0.0)
            else:
                occ.capsule(tb.p0, tb.p1, tb.r0, 0.0)
    lungs = np.zeros(heart.shape, bool) if lung is None else (lung > 0) & ~np.isfinite(occ.img) & ~heart
    return lungs, heart


def _box_cols(prefix: str, mask: np.ndarray) -> dict[str, int]:
    box = mask_box(mask) or (-1, -1, -1, -1)
    return {f"{prefix}_{c}": int(v) for c, v in zip(("x0", "y0", "x1", "y1"), box, strict=True)}


def anatomy_rows(plan: ph.StudyPlan) -> list[dict]:
    """One ``phantom_anatomy.csv`` row per slice of a study, in pipeline order (ascending z)."""
    rows = []
    for k in range(plan.n - 1, -1, -1):  # the apex has the highest z: pipeline index n-1-k
        lungs, heart = truth_masks(plan, k)
        roi = hull_mask(lungs | heart)
        rows.append({"StudyInstanceUID": plan.study, "SOPInstanceUID": plan.sops[k], "split": plan.split,
                     "slice_index": plan.n - 1 - k, "z": float(plan.z[k]),
                     **_box_cols("lung", lungs), **_box_cols("heart", heart), **_box_cols("roi", roi),
                     "lung_area": int(lungs.sum()), "heart_area": int(heart.sum()), "roi_area": int(roi.sum())})
    return rows


def _lung_base_t() -> float:
    """t below which a lung is still drawn (its size factor falls to _LUNG_VISIBLE)."""
    ts = np.linspace(0.5, 1.0, 5001)
    s = np.interp(ts, ph._LUNG_T, ph._LUNG_S)
    return float(ts[np.nonzero(s >= _LUNG_VISIBLE)[0][-1]])


def landmark_geometry(plan: ph.StudyPlan) -> dict[str, tuple[float, float, float]]:
    """Landmark -> (x mm, y mm, t) in the phantom's drawing frame."""
    g = plan.body["g"]
    tubes = {tb.name: tb for tb in plan.tubes}
    trunk, arch = tubes["trunk"], tubes["aorta_arch"]
    t_base = _lung_base_t()
    out = {
        "heart_centre": (24 * g, -30 * g, float(ph._HEART_T[2])),  # _draw_heart's centre, widest at t=0.7
        "trunk_bifurcation": (*trunk.at(trunk.t0)[:2], trunk.t0),
        "aortic_arch": (0.5 * (arch.p0[0] + arch.p1[0]), 0.5 * (arch.p0[1] + arch.p1[1]), 0.5 * (arch.t0 + arch.t1)),
        "carina": (0.0, -4 * g, 0.34),  # _draw_mediastinum: the trachea splits at t = 0.34
        "liver_top": (-0.35 * plan.body["a"], 0.0, 0.8),  # _draw_body: the liver appears below t = 0.8
    }
    for side in ("right", "left"):
        apex = ph._lung_ellipse(plan, side, 0.0)
        base = ph._lung_ellipse(plan, side, t_base)
        assert apex is not None and base is not None
        out[f"{side}_lung_apex"] = (apex[0], apex[1], 0.0)
        out[f"{side}_lung_base"] = (base[0], base[1], t_base)
    return out


def landmark_rows(plan: ph.StudyPlan) -> list[dict]:
    """One ``phantom_landmarks.csv`` row per landmark of a study."""
    cv = ph_draw._Canvas(plan.size, plan.pixel_spacing, plan.body["cy"])
    geo = landmark_geometry(plan)
    dt = float(plan.t[1] - plan.t[0]) if plan.n > 1 else 1.0
    rows = []
    for name in LANDMARKS:
        x, y, t = geo[name]
        k = (t - float(plan.t[0])) / dt  # anatomical (apex-first) slice position, fractional
        u, v = cv.px(x, y)
        rows.append({"StudyInstanceUID": plan.study, "split": plan.split, "landmark": name,
                     "x": round(u, 3), "y": round(v, 3), "slice_index": round(plan.n - 1 - k, 4),
                     "z": round(float(plan.z[0]) - k * plan.slice_spacing, 3),
                     "present": int(-0.5 <= k <= plan.n - 0.5)})
    return rows


def _study_truth(plan: ph.StudyPlan) -> tuple[list[dict], list[dict]]:
    return anatomy_rows(plan), landmark_rows(plan)


def write_anatomy_truth(out: Path | str, plans: list[ph.StudyPlan], workers: int = 1) -> None:
    """Write ``phantom_anatomy.csv`` and ``phantom_landmarks.csv`` for ``plans`` into ``out``."""
    workers = max(1, min(workers, len(plans)))
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_study_truth, plans, chunksize=1))
    else:
        results = [_study_truth(p) for p in plans]
    anat_cols = ["StudyInstanceUID", "SOPInstanceUID", "split", "slice_index", "z"]
    anat = pd.DataFrame([r for a, _ in results for r in a])
    lms = pd.DataFrame([r for _, lm in results for r in lm])
    if anat.empty:
        anat = pd.DataFrame(columns=anat_cols)
    pe_io.write_csv_atomic(anat, Path(out) / ANATOMY_FILE)
    pe_io.write_csv_atomic(lms, Path(out) / LANDMARKS_FILE)


def load_plans(phantom_dir: Path | str) -> dict[str, ph.StudyPlan]:
    """StudyInstanceUID -> plan of every study of a phantom, re-planned from its marker file."""
    marker = Path(phantom_dir) / ph.MARKER_FILE
    if not marker.is_file():
        raise FileNotFoundError(f"{marker}: not found; {phantom_dir} is not a phantom")
    p = json.loads(marker.read_text())
    try:
        plans = [pl for split, key in (("train", "train_studies"), ("test", "test_studies"))
                 for pl in ph.plan_split(split, p[key], p["seed"], p["size"], p["min_slices"], p["max_slices"],
                                         p.get("uid_style", "kaggle"), p.get("positive_rate", ph.P_POSITIVE),
                                         p.get("embolus_scale", 1.0))]
    except KeyError as e:
        raise ValueError(f"{marker}: missing phantom parameter {e}") from e
    return {pl.study: pl for pl in plans}
