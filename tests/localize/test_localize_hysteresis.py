"""Hysteresis clustering (condrea2024 rule): seeds above high, low voxels join within a (15, 15, 5) box."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pe.localize.hysteresis import hysteresis_clusters, relative_thresholds


def _blob(shape, centre, sigma):
    zz, yy, xx = np.indices(shape)
    cz, cy, cx = centre
    sz, sy, sx = sigma
    return np.exp(-(((zz - cz) / sz) ** 2 + ((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2) / 2)


def test_touching_blobs_with_separate_seeds_stay_two_clusters():
    shape = (9, 40, 60)
    heat = np.maximum(_blob(shape, (4, 20, 22), (1.5, 4, 4)), _blob(shape, (4, 20, 36), (1.5, 4, 4)))
    labels = hysteresis_clusters(heat, high=0.8, low=0.2)
    low_mask = heat >= 0.2
    # The low regions touch: classic connectivity-based hysteresis would make one object.
    assert ndimage.label(low_mask)[1] == 1
    assert labels.max() == 2
    # Each blob centre carries its own label, and the border lies half-way between the seeds.
    a, b = labels[4, 20, 22], labels[4, 20, 36]
    assert a > 0 and b > 0 and a != b
    assert labels[4, 20, 27] == a and labels[4, 20, 31] == b
    # Every clustered voxel is above low, every seed voxel is clustered.
    assert (heat[labels > 0] >= 0.2).all()
    assert (labels[heat >= 0.8] > 0).all()


def test_touching_seeds_form_one_cluster():
    shape = (5, 30, 40)
    heat = np.maximum(_blob(shape, (2, 15, 16), (1, 3, 3)), _blob(shape, (2, 15, 22), (1, 3, 3)))
    assert hysteresis_clusters(heat, high=0.6, low=0.2).max() == 1


def test_low_region_joins_only_near_a_seed():
    heat = np.zeros((9, 40, 60), np.float32)
    heat[4, 20, 10] = 1.0  # one seed voxel
    heat[4, 20, 13:16] = 0.4  # low region 3..5 px from the seed in x: inside the 7 px half-width
    heat[4, 20, 25:28] = 0.4  # same low values 15..17 px away: outside the box
    heat[4:7, 26, 10] = 0.4  # z 4..6 at y+6: inside only for |dz| <= 2
    heat[7, 20, 10] = 0.4  # 3 slices away in z: outside (z half-width 2)
    labels = hysteresis_clusters(heat, high=0.9, low=0.3)
    assert labels.max() == 1
    assert (labels[4, 20, 13:16] == 1).all()
    assert (labels[4, 20, 25:28] == 0).all()
    assert (labels[4:7, 26, 10] == 1).all()
    assert labels[7, 20, 10] == 0
    # A connected faint tail is cut at the box edge (the paper's "may miss long-tailed PEs").
    tail = np.zeros((1, 5, 40), np.float32)
    tail[0, 2, 0] = 1.0
    tail[0, 2, 1:30] = 0.5
    t = hysteresis_clusters(tail, high=0.9, low=0.3)
    assert (t[0, 2, :8] == 1).all() and (t[0, 2, 8:] == 0).all()


def test_neighbourhood_is_configurable_and_2d_input_works():
    heat = np.zeros((20, 40), np.float32)
    heat[10, 5] = 1.0
    heat[10, 12] = 0.5
    assert hysteresis_clusters(heat, 0.9, 0.3)[10, 12] == 1  # 7 px: inside (15, 15, 5)
    assert hysteresis_clusters(heat, 0.9, 0.3, neighbourhood_xyz=(5, 5, 1))[10, 12] == 0
    assert hysteresis_clusters(heat, 0.9, 0.3).ndim == 2


def test_no_seed_gives_no_cluster_and_bad_input_is_rejected():
    assert hysteresis_clusters(np.full((3, 8, 8), 0.5), high=0.9, low=0.1).max() == 0
    with pytest.raises(ValueError, match="low threshold"):
        hysteresis_clusters(np.zeros((3, 8, 8)), high=0.1, low=0.5)
    with pytest.raises(ValueError, match="odd"):
        hysteresis_clusters(np.zeros((3, 8, 8)), 0.5, 0.1, neighbourhood_xyz=(4, 15, 5))


def test_relative_thresholds_scale_with_the_peak():
    heat = np.array([0.0, 2.0, 4.0])
    assert relative_thresholds(heat, 0.5, 0.25) == (2.0, 1.0)
    hi, lo = relative_thresholds(np.zeros(3), 0.5, 0.25)
    assert hi == float("inf") and lo == float("inf")
