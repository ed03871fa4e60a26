"""Per-study lung bounding box from HU alone (no model), for cropping the CNN's input.

The 1st-place RSPECT solution trained a lung localizer and cropped to it; the anatomical crop of
papers/condrea2023_anatomically_aware_dual_hop.txt also helped. A threshold rule is enough here:

1. body = the largest connected component of ``HU > -500`` (soft tissue and bone), holes filled;
2. lung air = ``HU < -400`` inside the filled body; air outside the patient is connected to the
   image border through the background, so it is never a hole of the body and drops out;
3. per slice, components smaller than ``min_area`` of the grid are dropped (bowel gas, noise);
4. per study, a grid pixel counts when it is lung in at least ``min_slices_frac`` of the slices;
   the box of those pixels gets a margin of ``margin`` × the image size and is clamped to the image.

Masks are computed on a coarse grid (every ``stride``-th pixel, ~64 px per side), which is plenty
for a box and costs about 0.1 ms per slice, so every slice of the study is used (the cache and the
Kaggle kernel then get the same box from the same slices). A study without any lung air
gets the whole image as its box (cropping to it is then a no-op).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from pe.data.dicom import hu_from_pixels

BODY_HU = -500.0  # above: soft tissue, blood, bone (lung parenchyma is about -900 to -500)
AIR_HU = -400.0  # below, inside the body: aerated lung (plus partial-volume edges)
GRID = 64  # grid side for the masks: 8 px steps on a 512² slice, ample for a box with a 5 % margin


def grid_stride(rows: int, cols: int) -> int:
    """Subsampling step giving a mask grid of about GRID pixels on the longer side."""
    return max(1, round(max(rows, cols) / GRID))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled: everything not reachable from outside the image through
    non-mask pixels (4-connected, the dual of the 8-connected body). A flood fill from a 1-pixel
    frame is ~10x faster than scipy.ndimage.binary_fill_holes and gives the same result (tested)."""
    h, w = mask.shape
    canvas = np.zeros((h + 2, w + 2), dtype=np.uint8)
    canvas[1:-1, 1:-1] = mask
    cv2.floodFill(canvas, None, (0, 0), 2, flags=4)  # the frame and all outside air become 2
    return canvas[1:-1, 1:-1] != 2


def slice_lung_mask(hu: np.ndarray, min_area: float = 0.002) -> np.ndarray:
    """bool mask of lung air in one (already subsampled) HU slice."""
    body = (hu > BODY_HU).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(body, connectivity=8)
    if n <= 1:  # no tissue at all (above the patient, or an empty slice)
        return np.zeros(hu.shape, dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    filled = _fill_holes(labels == largest)
    lung = (filled & (hu < AIR_HU)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(lung, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= max(1.0, min_area * hu.size)
    keep[0] = False  # label 0 is the background
    return keep[labels]


@dataclass
class LungAccumulator:
    """Sums per-slice lung masks of one study on the coarse grid, then gives the study's box."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        self.stride = grid_stride(self.rows, self.cols)
        gh = -(-self.rows // self.stride)
        gw = -(-self.cols // self.stride)
        self.counts = np.zeros((gh, gw), dtype=np.int32)
        self.n_slices = 0

    def add(self, hu: np.ndarray) -> None:
        """Add one full-resolution HU slice of the study (other shapes are ignored)."""
        if hu.shape != (self.rows, self.cols):
            return
        self.counts += slice_lung_mask(hu[:: self.stride, :: self.stride])
        self.n_slices += 1

    def add_pixels(self, pixels: np.ndarray, slope: float, intercept: float) -> None:
        """Same as :meth:`add` from stored pixels, converting only the grid pixels to HU."""
        if pixels.shape != (self.rows, self.cols):
            return
        # hu_from_pixels is elementwise: these are exactly read_hu's values at the grid pixels.
        self.counts += slice_lung_mask(hu_from_pixels(pixels[:: self.stride, :: self.stride], slope, intercept))
        self.n_slices += 1

    def box(self, size: int, margin: float = 0.05, min_slices_frac: float = 0.02) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in pixels of a ``size``×``size`` resize of the slices; x1, y1 exclusive."""
        need = max(1, math.ceil(min_slices_frac * self.n_slices))
        ys, xs = np.nonzero(self.counts >= need)
        if len(ys) == 0:
            return 0, 0, size, size
        s = self.stride
        sy, sx = size / self.rows, size / self.cols
        # Grid pixel k covers original pixels [k*s, (k+1)*s); round outwards.
        x0 = math.floor(xs.min() * s * sx)
        x1 = math.ceil(min(self.cols, (xs.max() + 1) * s) * sx)
        y0 = math.floor(ys.min() * s * sy)
        y1 = math.ceil(min(self.rows, (ys.max() + 1) * s) * sy)
        m = round(margin * size)
        return max(0, x0 - m), max(0, y0 - m), min(size, x1 + m), min(size, y1 + m)
