"""Grad-CAM, integrated gradients, the pointing game and the box → input-frame mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pe.explain.cam import grad_cam
from pe.explain.ig import integrated_gradients
from pe.explain.pointing import boxes_mask, boxes_to_input_frame, fill_boxes, map_peak, pointing_game


class BlobNet(nn.Module):
    """Hand-made: channel 0 fires on bright 3×3 blobs, channel 1 on the dark background; the logit
    is mean(ch0) − mean(ch1). The feature maps are at half resolution (stride 2), so the CAM must be
    upsampled back to the input frame."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=3, stride=2, padding=1, bias=True)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0] = 1.0 / 9  # local mean
            self.conv.weight[1] = -1.0 / 9
            self.conv.bias.copy_(torch.tensor([-0.5, 0.5]))
        self.act = nn.ReLU()
        self.gradcam_layer = self.act

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.act(self.conv(x))
        return {"logit": f[:, 0].mean((1, 2)) - f[:, 1].mean((1, 2)), "embedding": f.mean((2, 3))}


def test_grad_cam_peak_falls_on_the_blob() -> None:
    torch.manual_seed(0)
    model = BlobNet().eval()
    x = torch.rand(3, 1, 32, 32) * 0.2
    centres = [(5, 7), (20, 25), (27, 10)]  # (row, col)
    for i, (r, c) in enumerate(centres):
        x[i, 0, r - 1:r + 2, c - 1:c + 2] = 1.0
    cams = grad_cam(model, x, model.gradcam_layer)
    assert cams.shape == (3, 32, 32)
    assert cams.min() >= 0 and np.isclose(cams.max(), 1.0)
    for cam, (r, c) in zip(cams, centres, strict=True):
        pr, pc = map_peak(cam)
        # Half-resolution features: the peak may sit one feature cell (2 px) off the blob centre.
        assert abs(pr - r) <= 2 and abs(pc - c) <= 2, (pr, pc, r, c)
    # The background channel has a negative weight: far from the blob the map is (near) zero.
    assert cams[0, 25:, 25:].max() < 0.05


def test_integrated_gradients_highlight_the_blob() -> None:
    torch.manual_seed(0)
    model = BlobNet().eval()
    x = torch.rand(1, 1, 24, 24) * 0.2
    x[0, 0, 14:17, 4:7] = 1.0
    ig = integrated_gradients(model, x, steps=16)
    assert ig.shape == (1, 24, 24)
    pr, pc = map_peak(ig[0])
    assert 13 <= pr <= 17 and 3 <= pc <= 7


def test_pointing_game_hits_misses_and_chance_rate() -> None:
    hit = np.zeros((10, 10))
    hit[2, 3] = 1.0  # row 2, col 3 lies in box x 2..5, y 1..4
    miss = np.zeros((10, 10))
    miss[8, 8] = 1.0
    flat = np.zeros((10, 10))  # constant: points nowhere, a miss
    box = [(2, 1, 5, 4)]  # 3 × 3 pixels = 9 % of the frame
    res = pointing_game([hit, miss, flat], [box, box, box])
    assert (res.n, res.hits, res.constant) == (3, 1, 1)
    assert "1 constant maps" in res.summary()
    # the miss peaks at (8, 8), sqrt(4**2 + 5**2) = 6.4 px from the box's nearest pixel (3, 4): near at 15 px, not at 5
    assert (res.tolerance, res.near) == (15.0, 2)
    # chance of the tolerant game: the share of the 10 x 10 frame within 15 px of the box (all of it) or 1 px
    assert res.near_chance == pytest.approx(1.0)
    assert pointing_game([hit], [box], tolerance=1).near_chance == pytest.approx((9 + 4 * 3) / 100)
    assert pointing_game([hit, miss, flat], [box, box, box], tolerance=5).near == 1
    # map mass inside the boxes, over the non-constant maps: all of the hit's, none of the miss's
    assert res.mass == pytest.approx(0.5)
    spread = np.ones((10, 10))
    spread[0, 0] = 2.0  # peak outside, 9 of 101 units inside the box
    r3 = pointing_game([spread], [box])
    assert (r3.hits, r3.near, r3.constant) == (0, 1, 0) and r3.mass == pytest.approx(9 / 101)
    assert np.isnan(pointing_game([flat], [box]).mass)
    assert res.accuracy == pytest.approx(1 / 3)
    assert res.chance == pytest.approx(0.09)
    # Two boxes, one overlapping the other: the union counts once.
    two = [(0, 0, 5, 2), (0, 0, 10, 1)]
    assert boxes_mask((10, 10), two).sum() == 10 + 5
    res2 = pointing_game([miss], [two])
    assert res2.hits == 0 and res2.constant == 0 and res2.chance == pytest.approx(0.15)
    # The right/bottom edge is exclusive: a peak at col 5 is outside box x 2..5.
    edge = np.zeros((10, 10))
    edge[2, 5] = 1.0
    assert pointing_game([edge], [box]).hits == 0
    with pytest.raises(ValueError, match="no box"):
        pointing_game([hit], [[(20, 20, 30, 30)]])


def test_boxes_map_through_cache_resize_crop_and_input_resize() -> None:
    # Original 512 px, cache 256 px (×0.5), lung crop x 64..192, y 32..160 (128 px), input 64 px (×0.5).
    boxes = [(200, 100, 40, 20), (0, 0, 10, 10)]  # the second lies outside the crop: dropped
    out = boxes_to_input_frame(boxes, (512, 512), 256, (64, 32, 192, 160), (64, 64))
    np.testing.assert_allclose(out, [[(100 - 64) * 0.5, (50 - 32) * 0.5, (120 - 64) * 0.5, (60 - 32) * 0.5]])
    # No crop: only the two resizes.
    np.testing.assert_allclose(boxes_to_input_frame([(256, 256, 64, 32)], (512, 512), 128, None, (64, 64)),
                               [[32, 32, 40, 36]])


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        )
        self.gradcam_layer = self.features
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        e = self.features(x).amax((2, 3))
        return {"logit": self.head(e)[:, 0], "embedding": e}


def _blob_batch(rng: np.random.Generator, n: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Noisy images with two dim 6×6 distractor squares each; positives add a bright 3×3 blob."""
    x = rng.normal(0.2, 0.08, (n, 1, size, size)).astype(np.float32)
    y = (np.arange(n) % 2).astype(np.float32)
    boxes = []
    for i in range(n):
        for _ in range(2):
            r, c = rng.integers(0, size - 6, 2)
            x[i, 0, r:r + 6, c:c + 6] += 0.35
        if y[i]:
            r, c = rng.integers(1, size - 4, 2)
            x[i, 0, r:r + 3, c:c + 3] = 1.0
            boxes.append([(c, r, c + 3, r + 3)])
        else:
            boxes.append(None)
    return torch.from_numpy(x), torch.from_numpy(y), boxes


def test_briefly_trained_cnn_points_at_blobs_well_above_chance() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        x, y, _ = _blob_batch(rng, 32)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x)["logit"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y, boxes = _blob_batch(np.random.default_rng(1), 80)
    pos = [i for i in range(len(y)) if y[i]]
    cams = grad_cam(model, x[pos], model.gradcam_layer)
    res = pointing_game(list(cams), [boxes[i] for i in pos])
    print(res.summary("Grad-CAM, synthetic blobs"))
    # Chance is ~1 % (9 of 1024 pixels); a model that learned the blob points at it most of the time.
    assert res.chance < 0.02
    assert res.accuracy >= 0.6 and res.accuracy > 10 * res.chance


def test_fill_boxes_paints_a_filling_defect_with_the_surrounding_contrast() -> None:
    x = torch.zeros(2, 3, 20, 20)
    x[:, :, 4:16, 4:16] = 1.0  # a bright contrast-filled vessel
    x[0, :, 8:11, 9:12] = 0.3  # a dark filling defect (the embolus) in sample 0
    out = fill_boxes(x, [np.array([[9, 8, 12, 11]]), None])
    assert torch.allclose(out[0, :, 8:11, 9:12], torch.ones(3, 3, 3))
    changed = (out != x).any(dim=1)
    assert changed[0].sum() == 9 and not changed[1].any()  # nothing outside the box, no box no change
    assert torch.equal(x[0, 0, 8, 9], torch.tensor(0.3))  # the input is not modified
