"""Per-slice lung, heart and PE region-of-interest masks from HU alone (classical, no model).

papers/condrea2023_anatomically_aware_dual_hop.txt crops every slice to the convex hull of the lungs
and the heart ("to fill any possible gaps between masks"): the heart keeps the pulmonary trunk in
view when a lung is collapsed or missing. The paper used trained segmentation models; none can be
downloaded here, so this module derives the masks with thresholds, connected components and
morphology. :class:`Masker` is the seam for a model-based replacement: anything that maps a study's
HU volume to :class:`StudyMasks` can be passed where :func:`masks_for_study` is used.

Per slice (``HU`` of one axial image, ``mm`` from the pixel spacing):

1. body = largest 8-connected component of ``HU > -500``, holes filled (lung.py's rule);
2. air = ``HU < -400`` inside the body, split into 8-connected components;
3. airway = small (< 700 mm², a trachea is < ~500 mm²), round (circularity > 0.5) air components
   whose centre lies in the medial band (< 30 % of the body half-width from its centre): the
   trachea and the main bronchi. Lungs = the other air components larger than 30 mm², holes
   filled (intrapulmonary vessels belong to the lung, as in the usual lung segmentations); air
   components under 200 mm² touching the body's outline are neither (skin folds; on a coarse grid,
   outside air the filled body encloses at a corner);
4. heart = in the space between the lungs (their convex hull minus the lungs), in front of the
   hilum line (lung centroid + 15 % of the lungs' height: excludes spine, descending aorta and
   oesophagus), the largest component of soft tissue / contrast (-30 < HU < 500) after an opening
   with a 4 mm disk, kept when it is large (> 1200 mm²) and holds contrast-filled blood
   (> 300 mm² above 100 HU: the chambers). Above the heart the great vessels are small blobs in
   mediastinal fat and fail the size test; below it nothing is enhanced. Across the study only the
   longest run of consecutive heart slices is kept (the heart is one organ);
5. ROI = convex hull of lungs ∪ heart (OpenCV), per slice.

Volumes are in the pipeline's slice order (``slice_index``: ascending z, so the head end is last).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
from scipy import ndimage

BODY_HU = -500.0
AIR_HU = -400.0
TISSUE_HU = (-30.0, 500.0)  # soft tissue and contrast-filled blood; fat (< -30) and bone (> 500) out
CONTRAST_HU = 100.0  # enhanced blood (chambers, pulmonary arteries) in a CTPA
AIRWAY_MAX_MM2 = 700.0
AIRWAY_MIN_CIRCULARITY = 0.5
AIRWAY_BAND = 0.30  # medial band, as a share of the body half-width
LUNG_MIN_MM2 = 30.0
RIM_AIR_MAX_MM2 = 200.0  # air touching the body outline and smaller than this is outside air, not lung
HEART_MIN_MM2 = 1200.0
HEART_MIN_CONTRAST_MM2 = 300.0
HEART_OPEN_MM = 4.0
HILUM_MARGIN = 0.15  # heart search area ends this share of the lungs' height behind their centroid
BoxT = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1, y1 exclusive


@dataclass
class StudyMasks:
    """bool (n, H, W) masks of one study in the order of the input volume.

    ``airway`` is kept because the landmark finder locates the carina from it."""

    lungs: np.ndarray
    heart: np.ndarray
    roi: np.ndarray
    airway: np.ndarray
    pixel_spacing: float

    @property
    def n(self) -> int:
        return int(self.lungs.shape[0])

    def roi_boxes(self, mode: str = "slice", slab: int = 5) -> list[BoxT | None]:
        """ROI box per slice: ``slice`` (its own hull), ``slab`` (union over ±``slab`` slices) or
        ``study`` (union over the study: one box for all slices). None where the ROI is empty."""
        return roi_boxes(self.roi, mode, slab)


class Masker(Protocol):
    """What the cache stage needs from a masker: classical (:func:`masks_for_study`) or a model."""

    def __call__(self, hu_volume: np.ndarray, pixel_spacing: float = ...) -> StudyMasks: ...


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every region not reachable from the image border filled (2-D): the result of
    ``scipy.ndimage.binary_fill_holes`` (4-connected background), by an OpenCV flood fill from a
    one-pixel frame, ~10x faster (the masker's main cost on a coarse grid; tested equal)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        return ndimage.binary_fill_holes(m)
    h, w = m.shape
    canvas = np.zeros((h + 2, w + 2), dtype=np.uint8)
    canvas[1:-1, 1:-1] = m
    cv2.floodFill(canvas, None, (0, 0), 2, flags=4)  # the frame and everything it reaches become 2
    return canvas[1:-1, 1:-1] != 2


def hull_mask(mask: np.ndarray) -> np.ndarray:
    """bool convex hull of all True pixels of a 2-D mask (empty stays empty)."""
    ys, xs = np.nonzero(mask)
    out = np.zeros(mask.shape, np.uint8)
    if len(ys) == 0:
        return out.astype(bool)
    pts = np.stack([xs, ys], axis=1).astype(np.int32)
    cv2.fillConvexPoly(out, cv2.convexHull(pts), 1)
    return out.astype(bool) | mask.astype(bool)


def mask_box(mask: np.ndarray) -> BoxT | None:
    """(x0, y0, x1, y1) of the True pixels of a 2-D mask, x1/y1 exclusive; None when empty."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def roi_boxes(roi: np.ndarray, mode: str = "slice", slab: int = 5) -> list[BoxT | None]:
    """Per-slice boxes of an (n, H, W) ROI volume; see :meth:`StudyMasks.roi_boxes`."""
    if mode not in ("slice", "slab", "study"):
        raise ValueError(f"roi box mode must be slice, slab or study, got {mode!r}")
    n = roi.shape[0]
    if mode == "study":
        box = mask_box(roi.any(axis=0))
        return [box] * n
    per = [mask_box(r) for r in roi]
    if mode == "slice":
        return per
    out: list[BoxT | None] = []
    for i in range(n):
        near = [b for b in per[max(0, i - slab): i + slab + 1] if b is not None]
        out.append(None if not near else (min(b[0] for b in near), min(b[1] for b in near),
                                          max(b[2] for b in near), max(b[3] for b in near)))
    return out


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Filled largest component of tissue (``HU > -500``): the patient, without the table's air."""
    body = (hu > BODY_HU).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(body, connectivity=8)
    if n <= 1:
        return np.zeros(hu.shape, bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return fill_holes(labels == largest)


def _circularity(component: np.ndarray) -> float:
    contours, _ = cv2.findContours(component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return 0.0
    c = max(contours, key=cv2.contourArea)
    perim = cv2.arcLength(c, True)
    return 0.0 if perim <= 0 else float(4 * math.pi * cv2.contourArea(c) / perim**2)


def split_air(hu: np.ndarray, body: np.ndarray, mm2: float) -> tuple[np.ndarray, np.ndarray]:
    """(lungs, airway) bool masks of one slice; ``mm2`` = area of one pixel in mm²."""
    air = ((hu < AIR_HU) & body).astype(np.uint8)
    n, labels, stats, cents = cv2.connectedComponentsWithStats(air, connectivity=8)
    if n <= 1:
        return np.zeros(hu.shape, bool), np.zeros(hu.shape, bool)
    cols = np.nonzero(body.any(axis=0))[0]
    body_cx, half_w = 0.5 * (cols[0] + cols[-1]), 0.5 * (cols[-1] - cols[0] + 1)
    area = stats[:, cv2.CC_STAT_AREA] * mm2
    big = area >= LUNG_MIN_MM2  # smaller: noise, partial-volume specks
    big[0] = False  # label 0 is the background
    # Small air touching the body's outline is outside air caught in a skin fold (on a coarse grid: a
    # staircase corner the filled 8-connected body closes), not lung; a lung may touch a thin chest wall.
    rim = body & ~cv2.erode(body.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    on_rim = np.zeros(n, dtype=bool)
    on_rim[np.unique(labels[rim])] = True
    big &= ~(on_rim & (area < RIM_AIR_MAX_MM2))
    is_airway = np.zeros(n, dtype=bool)
    medial = np.abs(cents[:, 0] - body_cx) < AIRWAY_BAND * half_w
    for j in np.flatnonzero(big & (area <= AIRWAY_MAX_MM2) & medial):  # few: the contour test is per component
        is_airway[j] = _circularity(labels == j) >= AIRWAY_MIN_CIRCULARITY
    lungs, airway = (big & ~is_airway)[labels], is_airway[labels]  # lookup tables: one pass over the pixels
    return fill_holes(lungs), airway


def heart_candidate(hu: np.ndarray, lungs: np.ndarray, body: np.ndarray, spacing: float) -> np.ndarray:
    """bool heart mask of one slice (step 4 of the module docstring), before the 3-D run filter."""
    empty = np.zeros(hu.shape, bool)
    ys = np.nonzero(lungs)[0]
    if len(ys) == 0:
        return empty
    y_lim = ys.mean() + HILUM_MARGIN * (ys.max() - ys.min() + 1)
    region = hull_mask(lungs) & ~lungs & body
    region[int(math.ceil(y_lim)):, :] = False
    tissue = region & (hu > TISSUE_HU[0]) & (hu < TISSUE_HU[1])
    tissue = cv2.morphologyEx(tissue.astype(np.uint8), cv2.MORPH_OPEN, _disk(HEART_OPEN_MM / spacing))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(tissue, connectivity=8)
    if n <= 1:
        return empty
    j = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mm2 = spacing * spacing
    comp = labels == j
    if stats[j, cv2.CC_STAT_AREA] * mm2 < HEART_MIN_MM2:
        return empty
    if np.count_nonzero(comp & (hu > CONTRAST_HU)) * mm2 < HEART_MIN_CONTRAST_MM2:
        return empty
    return fill_holes(comp)


def longest_run(flags: np.ndarray) -> np.ndarray:
    """bool array keeping only the longest run of consecutive True values (first on ties)."""
    out = np.zeros(len(flags), bool)
    best, start, best_start = 0, None, 0
    for i, f in enumerate([*flags.tolist(), False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            if i - start > best:
                best, best_start = i - start, start
            start = None
    out[best_start:best_start + best] = True
    return out


def masks_for_study(hu_volume: np.ndarray, pixel_spacing: float = 0.7) -> StudyMasks:
    """Classical :class:`StudyMasks` of a study's HU volume (n, H, W), square pixels of
    ``pixel_spacing`` mm (PixelSpacing; the thresholds are in mm², so it matters)."""
    vol = np.asarray(hu_volume)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise ValueError(f"masks_for_study expects an (n, H, W) HU volume, got shape {vol.shape}")
    if not pixel_spacing > 0:
        raise ValueError(f"pixel_spacing must be > 0 mm, got {pixel_spacing}")
    mm2 = pixel_spacing * pixel_spacing
    lungs = np.zeros(vol.shape, bool)
    airway = np.zeros(vol.shape, bool)
    heart = np.zeros(vol.shape, bool)
    for i, hu in enumerate(vol):
        body = body_mask(hu)
        lungs[i], airway[i] = split_air(hu, body, mm2)
        heart[i] = heart_candidate(hu, lungs[i], body, pixel_spacing)
    heart[~longest_run(heart.any(axis=(1, 2)))] = False
    roi = np.stack([hull_mask(lu | he) for lu, he in zip(lungs, heart, strict=True)])
    return StudyMasks(lungs=lungs, heart=heart, roi=roi, airway=airway, pixel_spacing=float(pixel_spacing))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty (nothing to find)."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b) / union)


def box_iou(a: BoxT | None, b: BoxT | None) -> float:
    """IoU of two (x0, y0, x1, y1) boxes (exclusive ends); 1.0 when both are None, 0.0 when one is."""
    if a is None or b is None:
        return float(a is None and b is None)
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return 0.0 if union <= 0 else inter / union
