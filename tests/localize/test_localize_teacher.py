"""The explainability teacher on a toy classifier whose logit is the max of a local blob average."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pe.localize.clusters import ClusterFilter, label_clusters, match_clusters
from pe.localize.teacher import (
    TeacherConfig,
    attribution_heatmap,
    cutout_fill,
    explain_study,
    refine_window,
    slice_offsets,
    windows_to_explain,
)

BLOBS = [((10, 10), 1.0), ((30, 40), 0.9), ((45, 15), 0.8)]  # (y, x) centre, brightness


class BlobMax(nn.Module):
    """Positive when some 5x5 neighbourhood is bright: logit = 20 (max local mean - 0.2). A 3x3 blob
    of brightness v has a local mean of 0.36 v, so blobs of v >= 0.6 are 'emboli'."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = F.avg_pool2d(x.mean(1, keepdim=True), 5, stride=1, padding=2)
        return {"logit": 20 * (y.amax(dim=(1, 2, 3)) - 0.2)}


def _window(blobs=BLOBS, channels=3, size=56, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = 0.02 * torch.randn((1, channels, size, size), generator=g)
    for (cy, cx), v in blobs:
        x[:, :, cy - 1:cy + 2, cx - 1:cx + 2] = v
    return x


def _cfg(**kw) -> TeacherConfig:
    base = dict(ig_steps=8, min_new_voxels=1, high=0.5, low=0.2)
    return TeacherConfig(**{**base, **kw})


def _in_blob_share(heat: np.ndarray, centre) -> float:
    cy, cx = centre
    return float(heat[..., cy - 1:cy + 2, cx - 1:cx + 2].sum() / heat.sum())


def test_ig_concentrates_on_the_blob():
    x = _window(blobs=[((20, 30), 1.0)])
    model = BlobMax().eval()
    group = np.zeros(3, int)
    heat = attribution_heatmap(model, x, _cfg(), x.mean(dim=(2, 3), keepdim=True), group, 1)
    assert heat.shape == (1, 56, 56) and (heat >= 0).all()
    assert _in_blob_share(heat, (20, 30)) > 0.9
    # The paper's voting variants (multi-reference, SmoothGrad) still point at the blob.
    heat_v = attribution_heatmap(model, x, _cfg(n_references=3, reference_noise=0.05, smoothgrad_samples=3,
                                               smoothgrad_std=0.02), x.mean(dim=(2, 3), keepdim=True), group, 1)
    assert np.unravel_index(heat_v.argmax(), heat_v.shape)[1:] in {(y, x) for y in range(19, 22) for x in range(29, 32)}
    assert _in_blob_share(heat_v, (20, 30)) > 0.6


def test_iterative_masking_finds_every_blob_and_stops_when_negative():
    model = BlobMax().eval()
    res = refine_window(model, _window(), _cfg(max_iter=10))
    assert res.stop == "negative" and res.n_rounds == 3
    assert res.probs[0] > 0.5 and res.probs[-1] < 0.5 and len(res.probs) == 4
    # Brightest blob first: round k clusters blob k.
    for k, ((cy, cx), _) in enumerate(BLOBS, start=1):
        assert res.iterations[0, cy, cx] == k
    assert set(np.unique(res.iterations)) == {0, 1, 2, 3}


def test_iterative_masking_stops_at_max_iterations_and_on_small_rounds():
    model = BlobMax().eval()
    res = refine_window(model, _window(), _cfg(max_iter=2))
    assert res.stop == "max_iter" and res.n_rounds == 2 and res.iterations.max() == 2
    (cy, cx), _ = BLOBS[2]
    assert res.iterations[0, cy, cx] == 0  # the dimmest blob is never reached
    small = refine_window(model, _window(), _cfg(min_new_voxels=50))  # a 3x3 blob is 9 voxels
    assert small.stop == "small" and small.n_rounds == 1


def test_explain_study_builds_a_3d_pseudo_mask_matching_the_embolus():
    n, size = 10, 48
    g = torch.Generator().manual_seed(1)
    vol = 0.02 * torch.randn((n, size, size), generator=g)
    vol[4:7, 20:23, 25:28] = 1.0  # an embolus on slices 4..6
    idx = np.clip(np.arange(n)[:, None] + np.arange(-1, 2)[None], 0, n - 1)
    inputs = vol[torch.from_numpy(idx)]  # (n, 3, H, W): one channel per slice offset -1, 0, 1
    res = explain_study(BlobMax(), inputs, _cfg(), channel_offsets=slice_offsets(1, windows=1))
    assert set(res.windows) <= set(range(3, 8)) and {4, 5, 6} <= set(res.windows)
    truth = np.zeros((n, size, size), np.int32)
    truth[4:7, 20:23, 25:28] = 1
    labels = res.labels()
    c = match_clusters(labels, truth)
    assert (c.tp, c.fp, c.fn) == (1, 0, 0)
    assert labels[5, 21, 26] > 0 and not labels[:3].any() and not labels[8:].any()
    # A size filter above the cluster's size removes it; rounds beyond 1 add nothing here.
    assert res.labels(flt=ClusterFilter(min_voxels=10_000, max_dist_px=None)).max() == 0
    assert (label_clusters(res.mask(up_to_iter=1)) > 0).sum() == (labels > 0).sum()


def test_label_gate_explains_only_labelled_slices_and_drops_voxels_elsewhere():
    n, size = 10, 48
    g = torch.Generator().manual_seed(1)
    vol = 0.02 * torch.randn((n, size, size), generator=g)
    vol[4:7, 20:23, 25:28] = 1.0  # an embolus on slices 4..6
    vol[0:3, 5:8, 5:8] = 1.0  # a bright spot on slices 0..2, which the labels call negative
    idx = np.clip(np.arange(n)[:, None] + np.arange(-1, 2)[None], 0, n - 1)
    inputs = vol[torch.from_numpy(idx)]
    offsets = slice_offsets(1, windows=1)
    free = explain_study(BlobMax(), inputs, _cfg(), channel_offsets=offsets)
    assert 1 in free.windows and free.mask()[1, 5:8, 5:8].any()  # ungated: the spot is "found"
    gate = np.zeros(n, bool)
    gate[[4, 6]] = True  # slice 5 unlabelled on purpose: its voxels go, though windows 4 and 6 vote on it
    res = explain_study(BlobMax(), inputs, _cfg(), channel_offsets=offsets, gate=gate)
    assert set(res.windows) == {4, 6}
    m = res.mask()
    assert m[4].any() and m[6].any() and not m[~gate].any()
    assert not (m & ~free.mask()).any()  # fewer voting windows: a subset of the ungated mask
    assert windows_to_explain(np.array([0.9, 0.2, 0.7]), 0.5).tolist() == [0, 2]
    assert windows_to_explain(np.array([0.9, 0.2, 0.7]), 0.5, np.array([False, True, True])).tolist() == [2]
    with pytest.raises(ValueError, match="gate has 2 entries for 3 windows"):
        windows_to_explain(np.array([0.9, 0.2, 0.7]), 0.5, np.array([True, True]))


def test_fill_options_and_bad_inputs():
    x = _window()
    with pytest.raises(ValueError, match="fill"):
        refine_window(BlobMax(), x, _cfg(fill="median"))
    with pytest.raises(ValueError, match="channels"):
        refine_window(BlobMax(), x, _cfg(fill=[0.0, 1.0]))
    with pytest.raises(ValueError, match="channel_offsets"):
        refine_window(BlobMax(), x, _cfg(), channel_offsets=np.zeros(5, int))
    with pytest.raises(ValueError, match="windows of one study"):
        explain_study(BlobMax(), x[0])
    res = refine_window(BlobMax(), x, _cfg(fill=[0.0]))
    assert res.stop == "negative" and res.n_rounds == 3
    assert len(cutout_fill(3)) == 21 and cutout_fill(0)[0] == pytest.approx(-0.485 / 0.229)
    assert slice_offsets(1).tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1]
