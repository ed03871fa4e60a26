"""Per-slice PE region-of-interest boxes (lungs ∪ heart, convex hull) cheap enough for stage 02.

:func:`pe.anatomy.masks.masks_for_study` costs ~50 ms per slice at 256 px; the cache's budget is
20 % of its ~5-10 ms per slice. So :class:`RoiAccumulator` runs the same masker

- on a coarse grid: every ``stride``-th pixel, ~``ROI_GRID`` = 64 px per side (8-pixel steps on a
  512² slice, 5.6 mm at 0.7 mm pixels; the masker's thresholds are in mm², so it is given the grid's
  spacing), exactly as :class:`pe.anatomy.lungbox.LungAccumulator` samples its grid, and
- on every ``ROI_EVERY``-th slice of the study (positions 0, k, 2k, ... and the last one); a slice in
  between gets the union of the boxes of the two sampled slices around it (conservative: a box never
  shrinks between samples), a sampled slice its own box.

Grid boxes are rounded outwards (grid pixel j covers original pixels [j·s, (j+1)·s)), mapped to the
cached image's pixels and widened by ``ROI_MARGIN`` of the image side. A slice whose two sampled
neighbours have no ROI (above the apices, below the bases) is ``found = False`` and gets the union
of the study's boxes (the whole image when the study has none), so every row is a usable crop.

The cache (from stored pixels, :meth:`RoiAccumulator.add_pixels`) and the Kaggle kernel (from
``read_hu``, :meth:`RoiAccumulator.add`) feed the same HU grid values and get the same boxes (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from pe.anatomy.masks import StudyMasks, mask_box, masks_for_study
from pe.data.dicom import hu_from_pixels

ROI_GRID = 64  # grid side of the masker, pixels
ROI_EVERY = 2  # mask every k-th slice; the others are interpolated (union of the two around)
ROI_MARGIN = 0.02  # margin around the hull, share of the image side
DEFAULT_SPACING_MM = 0.7  # PixelSpacing when a file has none (typical CTPA)
ROI_COLUMNS = ["StudyInstanceUID", "slice_index", "x0", "y0", "x1", "y1", "size", "found"]
ROI_MODES = ("slice", "slab", "study")
CROP_MODES = ("lung", "roi_slice", "roi_slab", "roi_study")  # CNNConfig.crop_mode


def pixel_spacing_mm(ds: object) -> float:
    """Mean of a DICOM dataset's PixelSpacing (mm), or ``DEFAULT_SPACING_MM`` when absent or invalid."""
    try:
        vals = [float(v) for v in ds.PixelSpacing]  # type: ignore[attr-defined]
        sp = float(np.mean(vals))
    except (AttributeError, TypeError, ValueError, KeyError):
        return DEFAULT_SPACING_MM
    return sp if math.isfinite(sp) and 0.05 < sp < 10 else DEFAULT_SPACING_MM


class RoiAccumulator:
    """Collects the coarse HU grids of the sampled slices of one study (z order), then gives every
    slice's ROI box in the pixels of a ``size``×``size`` resize (:meth:`boxes`)."""

    def __init__(self, n: int, rows: int, cols: int, pixel_spacing: float = DEFAULT_SPACING_MM,
                 grid: int = ROI_GRID, every: int = ROI_EVERY,
                 masker: Callable[..., StudyMasks] = masks_for_study) -> None:
        if n < 1 or rows < 1 or cols < 1 or grid < 1 or every < 1:
            raise ValueError(f"RoiAccumulator needs n, rows, cols, grid, every >= 1, got {(n, rows, cols, grid, every)}")
        self.n, self.rows, self.cols, self.every = int(n), int(rows), int(cols), int(every)
        self.stride = max(1, round(max(rows, cols) / grid))
        self.spacing = float(pixel_spacing)
        self.masker = masker
        self.positions: list[int] = []
        self.grids: list[np.ndarray] = []

    def wants(self, k: int) -> bool:
        """Whether slice position ``k`` (0..n-1, z order) is one of the masked slices."""
        return k % self.every == 0 or k == self.n - 1

    def add(self, k: int, hu: np.ndarray) -> None:
        """Full-resolution HU slice at position ``k``; ignored when not wanted or of another shape."""
        if self.wants(k) and hu.shape == (self.rows, self.cols):
            self.positions.append(int(k))
            self.grids.append(np.ascontiguousarray(hu[:: self.stride, :: self.stride], dtype=np.float32))

    def add_pixels(self, k: int, pixels: np.ndarray, slope: float, intercept: float) -> None:
        """Same as :meth:`add` from stored pixels, converting only the grid pixels to HU (elementwise,
        so the values equal ``read_hu``'s at those pixels)."""
        if self.wants(k) and pixels.shape == (self.rows, self.cols):
            self.positions.append(int(k))
            self.grids.append(hu_from_pixels(pixels[:: self.stride, :: self.stride], slope, intercept))

    def sample_boxes(self, size: int, margin: float = ROI_MARGIN) -> tuple[np.ndarray, np.ndarray]:
        """(positions (m,), boxes (m, 4) float64 NaN where empty) of the masked slices, in the
        pixels of a ``size``×``size`` image."""
        order = np.argsort(self.positions, kind="stable")
        pos = np.asarray(self.positions, dtype=np.int64)[order]
        out = np.full((len(pos), 4), np.nan)
        if not len(pos):
            return pos, out
        masks = self.masker(np.stack([self.grids[i] for i in order]), self.spacing * self.stride)
        s, sy, sx, m = self.stride, size / self.rows, size / self.cols, round(margin * size)
        for j, roi in enumerate(masks.roi):
            b = mask_box(roi)
            if b is None:
                continue
            x0 = math.floor(b[0] * s * sx) - m
            y0 = math.floor(b[1] * s * sy) - m
            x1 = math.ceil(min(self.cols, b[2] * s) * sx) + m
            y1 = math.ceil(min(self.rows, b[3] * s) * sy) + m
            out[j] = (max(0, x0), max(0, y0), min(size, x1), min(size, y1))
        return pos, out

    def boxes(self, size: int, margin: float = ROI_MARGIN) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (n, 4) int32 x0, y0, x1, y1 with x1/y1 exclusive, found (n,) bool) of every slice;
        see the module docstring for the slices between samples and those without a ROI."""
        pos, sb = self.sample_boxes(size, margin)
        return interpolate_boxes(self.n, pos, sb, size)


def _union(rows: np.ndarray) -> np.ndarray:
    return np.array([rows[:, 0].min(), rows[:, 1].min(), rows[:, 2].max(), rows[:, 3].max()])


def interpolate_boxes(n: int, pos: np.ndarray, sample: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every slice's box from the sampled ones (NaN rows = no ROI): union of the boxes of the sampled
    slices at or just around it; slices with none take the union of all (or the whole image)."""
    full = np.array([0, 0, size, size], dtype=np.float64)
    valid = ~np.isnan(sample).any(axis=1) if len(sample) else np.zeros(0, bool)
    fallback = _union(sample[valid]) if valid.any() else full
    out = np.tile(fallback, (n, 1))
    found = np.zeros(n, dtype=bool)
    if len(pos):
        right = np.searchsorted(pos, np.arange(n), side="left")  # first sample >= i
        for i in range(n):
            r = min(int(right[i]), len(pos) - 1)
            near = {r} if pos[r] == i else {max(r - 1, 0), r}
            rows = sample[[j for j in sorted(near) if valid[j]]]
            if len(rows):
                out[i], found[i] = _union(rows), True
    return out.astype(np.int32), found


def crop_boxes(boxes: np.ndarray, found: np.ndarray, mode: str = "slice", slab: int = 5) -> np.ndarray:
    """(n, 4) boxes to crop each slice with: ``slice`` = its own, ``slab`` = union over the found boxes
    within ±``slab`` slices (its own when none is), ``study`` = union of the study's found boxes
    (all rows the same; the stored boxes when none is found)."""
    if mode not in ROI_MODES:
        raise ValueError(f"ROI crop mode must be one of {ROI_MODES}, got {mode!r}")
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    f = np.asarray(found, dtype=bool)
    if mode == "slice" or not f.any():
        return b.copy()
    if mode == "study":
        return np.tile(_union(b[f]), (len(b), 1))
    out = b.copy()
    for i in range(len(b)):
        lo, hi = max(0, i - slab), i + slab + 1
        sel = f[lo:hi]
        if sel.any():
            out[i] = _union(b[lo:hi][sel])
    return out


def roi_mode(cfg: Any) -> str | None:
    """``slice`` / ``slab`` / ``study`` when a CNNConfig crops to the ROI (``crop_lung`` and
    ``crop_mode`` roi_*), None for the lung box or no crop; an unknown crop_mode is an error."""
    mode = getattr(cfg, "crop_mode", "lung")
    if mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {mode!r}")
    return None if mode == "lung" or not cfg.crop_lung else mode.removeprefix("roi_")


def study_roi_boxes(boxes: np.ndarray, found: np.ndarray, cfg: Any, image_size: float = 1.0,
                    roi_size: float = 1.0) -> np.ndarray:
    """(n, 4) float crop box per centre slice of one study (z order) in the pixels of ``image_size``
    images, from its stored ROI rows (pixels of ``roi_size`` images) and ``cfg``'s ROI mode."""
    mode = roi_mode(cfg)
    if mode is None:
        raise ValueError(f"crop_mode {getattr(cfg, 'crop_mode', None)!r} with crop_lung={cfg.crop_lung} is no ROI crop")
    return crop_boxes(boxes, found, mode, int(getattr(cfg, "crop_roi_slab", 5))) * (image_size / float(roi_size))
