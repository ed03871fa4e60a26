"""3D hysteresis clustering of an explanation heatmap, as in condrea2024 (Sec. III-B).

The paper's rule: voxels above a *high* threshold are seeds; a voxel above a *low* threshold joins a
cluster when it lies inside the (15, 15, 5) (x, y, z) box neighbourhood of a seed voxel. Unlike the
classic hysteresis (e.g. ``skimage.filters.apply_hysteresis_threshold``), low voxels do not chain
through each other: a low region joins only where it is within the box of a seed, so a long faint
tail is cut at the box edge ("may miss parts of thin long-tailed PEs") and two emboli whose faint
halos touch stay apart ("robust to clustered PEs whose heat maps may intersect").

How clusters are formed (our reading, written down because the paper leaves it open):
- seeds are the connected components (26-connectivity) of the high mask; each component is one
  cluster, so two touching blobs with *separate* seed components stay two clusters even when their
  low regions merge into one connected low region;
- a low voxel inside the boxes of several seed components goes to the nearest seed voxel, distance
  measured in box-normalised units (each axis divided by the box half-width), so the border between
  two touching clusters runs half-way between their seeds;
- seeds that touch each other form one cluster (they are one component).

Arrays are (z, y, x); the neighbourhood is given as (x, y, z) like the paper and converted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

PAPER_NEIGHBOURHOOD_XYZ = (15, 15, 5)


def _half_widths_zyx(neighbourhood_xyz: Sequence[int]) -> tuple[int, int, int]:
    """(z, y, x) half-widths of an odd (x, y, z) box; e.g. (15, 15, 5) → (2, 7, 7)."""
    if len(neighbourhood_xyz) != 3 or any(int(n) < 1 or int(n) % 2 == 0 for n in neighbourhood_xyz):
        raise ValueError(f"neighbourhood must be 3 odd positive sizes (x, y, z), got {neighbourhood_xyz}")
    nx, ny, nz = (int(n) for n in neighbourhood_xyz)
    return nz // 2, ny // 2, nx // 2


def hysteresis_clusters(
    heatmap: np.ndarray,
    high: float,
    low: float,
    neighbourhood_xyz: Sequence[int] = PAPER_NEIGHBOURHOOD_XYZ,
) -> np.ndarray:
    """int32 cluster labels (z, y, x) of ``heatmap`` (0 = background, 1..n = clusters).

    ``heatmap`` may also be 2D (y, x); it is then treated as one slice and a 2D array is returned.
    Thresholds are absolute (use :func:`relative_thresholds` for fractions of the map's peak); a
    voxel belongs to a cluster when it is >= ``high`` (a seed) or >= ``low`` and within the box of a
    seed voxel.
    """
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim not in (2, 3):
        raise ValueError(f"heatmap must be (z, y, x) or (y, x), got shape {heat.shape}")
    if not low <= high:
        raise ValueError(f"low threshold {low} must not exceed high threshold {high}")
    squeeze = heat.ndim == 2
    if squeeze:
        heat = heat[None]
    half = _half_widths_zyx(neighbourhood_xyz)
    seeds = heat >= high
    seed_labels, n = ndimage.label(seeds, structure=np.ones((3, 3, 3), bool))
    out = np.zeros(heat.shape, np.int32)
    if n == 0:
        return out[0] if squeeze else out
    box = np.ones(tuple(2 * h + 1 for h in half), bool)
    reach = ndimage.binary_dilation(seeds, structure=box)
    candidates = reach & (heat >= low)
    # Nearest seed voxel of every voxel, in box-normalised distance (a box half-width = 1 on each axis).
    sampling = tuple(1.0 / max(h, 1) for h in half)
    idx = ndimage.distance_transform_edt(~seeds, sampling=sampling, return_distances=False, return_indices=True)
    nearest = seed_labels[tuple(idx)]
    out[candidates] = nearest[candidates]
    return out[0] if squeeze else out


def relative_thresholds(heatmap: np.ndarray, high: float, low: float) -> tuple[float, float]:
    """Absolute (high, low) thresholds as fractions of the map's peak: attribution scales differ
    from window to window, so the teacher thresholds each map relative to its own maximum. A map
    without positive values gets thresholds no voxel can reach."""
    peak = float(np.max(heatmap)) if np.size(heatmap) else 0.0
    if not peak > 0:
        return float("inf"), float("inf")
    return high * peak, low * peak
