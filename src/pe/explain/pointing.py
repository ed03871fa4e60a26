"""How well explanation maps point at emboli.

- :func:`pointing_game`: a map "hits" when its peak pixel lies inside a true embolus box. The chance
  rate is the share of the map covered by the boxes: a peak placed uniformly at random hits with
  exactly that probability, so accuracy above it means the maps carry localisation information.
  It also plays Zhang et al. (2016)'s tolerant game (a peak within 15 px of a box hits; chance = the
  share of the frame that close to a box), counts constant maps and measures the map mass in the boxes.
- :func:`boxes_to_input_frame`: embolus boxes in original DICOM pixels -> the model input frame
  (cache resize, lung crop, resize to the input size), so maps and boxes are compared in one frame.
- :func:`fill_boxes`: the occlusion check's input, each box painted over with the surrounding contrast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

TOLERANCE_PX = 15.0  # Zhang et al. (2016)'s pointing-game tolerance, in map pixels


def map_peak(m: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the maximum of a 2-D map; None when the map is constant (it points nowhere)."""
    m = np.asarray(m)
    if m.ndim != 2:
        raise ValueError(f"map must be 2-D, got shape {m.shape}")
    if not np.isfinite(m).all() or m.max() == m.min():
        return None
    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
    return int(r), int(c)


def _pixel_span(lo: float, hi: float, n: int) -> tuple[int, int]:
    """Pixels [a, b) that a continuous interval [lo, hi) touches, clipped to [0, n)."""
    a = int(np.clip(np.floor(lo), 0, n))
    b = int(np.clip(np.ceil(hi), 0, n))
    return a, b


def boxes_mask(shape: tuple[int, int], boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Boolean (H, W) mask of the pixels covered by boxes (x0, y0, x1, y1), x1/y1 exclusive."""
    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=float).reshape(-1, 4):
        c0, c1 = _pixel_span(x0, x1, w)
        r0, r1 = _pixel_span(y0, y1, h)
        mask[r0:r1, c0:c1] = True
    return mask


@dataclass(frozen=True)
class PointingResult:
    """Pointing-game outcome over n maps: hits (peak inside a box), accuracy = hits / n, chance = mean box
    share; how many maps were constant (no peak: counted as misses; an attention loss that trains negatives
    towards an empty map can switch a map off instead of moving it); ``near``: peaks within ``tolerance``
    pixels of a box (Zhang et al. 2016's pointing game allows 15 px), ``near_chance`` its chance rate (the
    mean share of the frame within ``tolerance`` of a box); ``mass``: the mean share of a non-constant
    map's (non-negative) sum that lies inside the boxes (NaN when every map is constant)."""

    n: int
    hits: int
    accuracy: float
    chance: float
    constant: int
    near: int
    tolerance: float
    mass: float
    near_chance: float

    def summary(self, name: str = "maps") -> str:
        ratio = self.accuracy / self.chance if self.chance > 0 else float("nan")
        return (f"pointing game ({name}): {self.hits}/{self.n} peaks inside an embolus box = "
                f"{self.accuracy:.3f} vs chance {self.chance:.3f} ({ratio:.1f}x); {self.near} within "
                f"{self.tolerance:g} px (chance {self.near_chance:.3f}); {self.constant} constant maps; "
                f"map mass inside the boxes {self.mass:.3f}")


def pointing_game(
    maps: Sequence[np.ndarray] | np.ndarray,
    boxes: Sequence[np.ndarray | Sequence[Sequence[float]]],
    tolerance: float = TOLERANCE_PX,
) -> PointingResult:
    """Share of maps whose peak lies inside one of that map's boxes, and the chance rate.

    ``boxes[i]`` holds the boxes (x0, y0, x1, y1) of map i in the map's pixel frame. Maps without a
    box are an error (the game is only defined where the truth is known); a constant map is a miss.
    Also counts peaks within ``tolerance`` pixels of a box and the map mass inside the boxes.
    """
    if len(maps) != len(boxes):
        raise ValueError(f"{len(maps)} maps but {len(boxes)} box lists")
    if len(maps) == 0:
        raise ValueError("pointing game needs at least one map")
    hits, near, constant, shares, near_shares, mass = 0, 0, 0, [], [], []
    for i, (m, b) in enumerate(zip(maps, boxes, strict=True)):
        m = np.asarray(m)
        mask = boxes_mask(m.shape, b)
        if not mask.any():
            raise ValueError(f"map {i} has no box inside the frame")
        shares.append(float(mask.mean()))
        dist = ndimage.distance_transform_edt(~mask)  # pixels to the nearest box pixel, 0 inside
        near_shares.append(float((dist <= tolerance).mean()))
        peak = map_peak(m)
        if peak is None:
            constant += 1
            continue
        d = float(dist[peak])
        hits += int(d == 0)
        near += int(d <= tolerance)
        pos = np.clip(m, 0, None)
        mass.append(float(pos[mask].sum() / pos.sum()) if pos.sum() > 0 else 0.0)
    n = len(maps)
    return PointingResult(n=n, hits=hits, accuracy=hits / n, chance=float(np.mean(shares)), constant=constant,
                          near=near, tolerance=float(tolerance), mass=float(np.mean(mass)) if mass else float("nan"),
                          near_chance=float(np.mean(near_shares)))


def boxes_to_input_frame(
    boxes_xywh: np.ndarray | Sequence[Sequence[float]],
    original_shape: tuple[int, int],
    cache_size: int,
    crop: Sequence[float] | None,
    input_shape: tuple[int, int],
) -> np.ndarray:
    """Map embolus boxes from original DICOM pixels to the model input frame.

    ``boxes_xywh``: (n, 4) x, y, width, height in original pixels (train_boxes.csv);
    ``original_shape``: (Rows, Columns) of the DICOM; the cache resized it to ``cache_size`` square;
    ``crop``: the lung box (x0, y0, x1, y1) in cache pixels the input was cut from (None: no crop);
    ``input_shape``: (H, W) the crop was resized to. Returns (m, 4) boxes (x0, y0, x1, y1) clipped to
    the frame; boxes falling entirely outside the crop are dropped.
    """
    b = np.asarray(boxes_xywh, dtype=float).reshape(-1, 4)
    rows, cols = original_shape
    sx, sy = cache_size / cols, cache_size / rows
    x0, y0 = b[:, 0] * sx, b[:, 1] * sy
    x1, y1 = (b[:, 0] + b[:, 2]) * sx, (b[:, 1] + b[:, 3]) * sy
    cx0, cy0, cx1, cy1 = (0.0, 0.0, float(cache_size), float(cache_size)) if crop is None else map(float, crop)
    h, w = input_shape
    kx, ky = w / (cx1 - cx0), h / (cy1 - cy0)
    out = np.stack([(x0 - cx0) * kx, (y0 - cy0) * ky, (x1 - cx0) * kx, (y1 - cy0) * ky], axis=1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep]


def fill_boxes(x: torch.Tensor, boxes: Sequence[np.ndarray | None], margin: int = 3, q: float = 0.9) -> torch.Tensor:
    """A copy of ``x`` (B, C, H, W) with each sample's boxes (x0, y0, x1, y1) filled, per channel, with
    the ``q`` quantile of the box grown by ``margin`` pixels: an embolus (a dark filling defect in a
    bright contrast-filled artery) is painted over with the artery's own contrast. The drop of the PE
    logit from ``x`` to this copy measures how much the model relies on the emboli themselves."""
    out = x.clone()
    h, w = x.shape[-2:]
    for i, b in enumerate(boxes):
        if b is None or len(b) == 0:
            continue
        inner = torch.from_numpy(boxes_mask((h, w), b)).to(x.device)
        outer = torch.from_numpy(boxes_mask((h, w), np.asarray(b, float) + [-margin, -margin, margin, margin]))
        outer = outer.to(x.device)
        if not inner.any():
            continue
        for c in range(x.shape[1]):
            out[i, c][inner] = torch.quantile(x[i, c][outer].float(), q).to(x.dtype)
    return out
