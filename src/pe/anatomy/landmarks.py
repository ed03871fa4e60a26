"""Anatomical landmarks: pretraining targets for a 2.5D sample, and a classical finder for real data.

papers/condrea2023_anatomically_aware_dual_hop.txt pretrains the slice CNN to regress landmark
positions: x and y normalised to [0, 1] by the image size, and z as the distance in slices from the
sample's centre slice divided by 600 (about the most slices of an RSPECT study), so the target does
not depend on where the scan starts. Landmarks outside the study get a presence mask of 0 and no loss.

Slice positions are in the pipeline's order (``slice_index``: ascending z). The phantom writes the
truth of :data:`pe.synthetic.anatomy_truth.LANDMARKS`; :func:`find_landmarks` derives the subset a
classical method can see on real data from :class:`pe.anatomy.masks.StudyMasks`: lung apices and
bases (first / last slice of each lung), the carina (the slice where the single airway splits in
two) and the heart centre (centroid of the heart mask).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from pe.anatomy.masks import StudyMasks

Z_SCALE = 600.0  # slices; the paper's normaliser of the z distance
LANDMARKS: tuple[str, ...] = ("heart_centre", "trunk_bifurcation", "aortic_arch", "carina", "right_lung_apex",
                              "left_lung_apex", "right_lung_base", "left_lung_base", "liver_top")
FOUND_BY_FINDER: tuple[str, ...] = ("heart_centre", "carina", "right_lung_apex", "left_lung_apex",
                                    "right_lung_base", "left_lung_base")
Point = tuple[float, float, float]  # x px, y px, slice_index (fractional)


def landmark_array(points: Mapping[str, Point | None], names: Sequence[str] = LANDMARKS) -> np.ndarray:
    """(L, 3) float64 of x, y, slice_index in ``names`` order; NaN rows for missing landmarks."""
    out = np.full((len(names), 3), np.nan)
    for i, n in enumerate(names):
        p = points.get(n)
        if p is not None:
            out[i] = p
    return out


def landmark_targets(points: np.ndarray, center: int, width: int, height: int,
                     box: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(targets (L, 3) float32, present (L,) bool) for a 2.5D sample centred on slice ``center``.

    ``points``: (L, 3) x, y (pixels of a ``width``×``height`` image) and slice_index, NaN when the
    landmark is not in the study. ``box`` (x0, y0, x1, y1): the crop the model sees; x, y are then
    relative to it. Targets: x, y in [0, 1] and (slice - center) / 600; absent rows are 0.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"landmark points must be (L, 3) x, y, slice; got shape {pts.shape}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x0, y0, x1, y1 = (0.0, 0.0, float(width), float(height)) if box is None else map(float, box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty crop box {box}")
    present = np.isfinite(pts).all(axis=1)
    tgt = np.zeros(pts.shape, np.float32)
    p = pts[present]
    tgt[present, 0] = (p[:, 0] - x0) / (x1 - x0)
    tgt[present, 1] = (p[:, 1] - y0) / (y1 - y0)
    tgt[present, 2] = (p[:, 2] - center) / Z_SCALE
    return tgt, present


def landmark_loss(pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean squared error over present landmarks only ((B, L, 3) predictions and targets, (B, L) mask);
    0 (with a gradient) when no landmark is present in the batch."""
    m = present.to(pred.dtype).unsqueeze(-1).expand_as(pred)
    denom = m.sum().clamp_min(1.0)
    return ((pred - target) ** 2 * m).sum() / denom


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def _lung_sides(lungs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) lung masks of a study: patient right = image left of the study's midline."""
    cols = np.nonzero(lungs.any(axis=(0, 1)))[0]
    mid = 0.5 * (cols[0] + cols[-1])
    right = lungs.copy()
    right[:, :, int(np.floor(mid)) + 1:] = False
    return right, lungs & ~right


def _carina(airway: np.ndarray) -> Point | None:
    """Where the airway splits: scanning from the head (last index) down, the trachea's centroid on
    the last slice with a single airway component before one with two."""
    import cv2

    prev: tuple[int, tuple[float, float]] | None = None
    for i in range(len(airway) - 1, -1, -1):
        n, _, _, cents = cv2.connectedComponentsWithStats(airway[i].astype(np.uint8), connectivity=8)
        if n - 1 == 1:
            prev = (i, (float(cents[1][0]), float(cents[1][1])))
        elif n - 1 >= 2 and prev is not None:
            return prev[1][0], prev[1][1], prev[0] - 0.5
    return None


def find_landmarks(masks: StudyMasks, min_pixels: int = 10) -> dict[str, Point | None]:
    """Classical landmarks of :data:`FOUND_BY_FINDER` from a study's masks (pipeline order)."""
    out: dict[str, Point | None] = dict.fromkeys(FOUND_BY_FINDER)
    if masks.lungs.any():
        for side, lung in zip(("right", "left"), _lung_sides(masks.lungs), strict=True):
            slices = np.nonzero(lung.sum(axis=(1, 2)) >= min_pixels)[0]
            if len(slices) == 0:
                continue
            top, bottom = int(slices[-1]), int(slices[0])
            out[f"{side}_lung_apex"] = (*_centroid(lung[top]), float(top))
            out[f"{side}_lung_base"] = (*_centroid(lung[bottom]), float(bottom))
    if masks.heart.any():
        zs, ys, xs = np.nonzero(masks.heart)
        out["heart_centre"] = (float(xs.mean()), float(ys.mean()), float(zs.mean()))
    out["carina"] = _carina(masks.airway)
    return out


def landmark_errors_mm(found: Mapping[str, Point | None], truth: Mapping[str, Point | None],
                       pixel_spacing: float, slice_spacing: float) -> dict[str, float]:
    """Euclidean error in mm per landmark present in both (x, y by pixel, z by slice spacing)."""
    errs = {}
    for name, f in found.items():
        t = truth.get(name)
        if f is None or t is None:
            continue
        d = np.array([(f[0] - t[0]) * pixel_spacing, (f[1] - t[1]) * pixel_spacing, (f[2] - t[2]) * slice_spacing])
        errs[name] = float(np.linalg.norm(d))
    return errs
