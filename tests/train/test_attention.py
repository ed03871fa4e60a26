"""The GAIN_ext attention loss: in-graph Grad-CAM, mask downsampling, continuous Dice, annotated-only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pe.explain.cam import grad_cam
from pe.train.attention import (
    AttentionLossConfig,
    attention_loss,
    attention_maps,
    capture_features,
    continuous_dice_loss,
    downsample_masks,
)


class TinyCNN(nn.Module):
    """Conv → BN → ReLU (stride 4) → gradcam_layer → avg pool → linear, like SliceCNN's layout."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.gradcam_layer = nn.Identity()
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.gradcam_layer(self.features(x))
        return {"logit": self.head(f.mean((2, 3))).squeeze(1)}


def _toy_batch(n: int = 8, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half positives: a bright 6×6 square (the "embolus") at a random place, and a bright distractor
    square on every image; masks mark only the embolus."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 0.3
    masks = torch.zeros(n, size, size)
    y = torch.zeros(n)
    for i in range(n):
        r, c = (int(v) for v in torch.randint(0, size - 6, (2,), generator=g))
        x[i, 0, 1:5, 1:5] = 1.0  # distractor in a corner, on every image
        if i % 2 == 0:
            x[i, 0, r:r + 6, c:c + 6] = 1.0
            masks[i, r:r + 6, c:c + 6] = 1
            y[i] = 1
    return x, masks, y


def _loss(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, annotated: torch.Tensor,
          cfg: AttentionLossConfig | None = None) -> torch.Tensor:
    with capture_features(model.gradcam_layer) as feats:
        out = model(x)
    return attention_loss(feats.value, out["logit"], masks, annotated, cfg)


def test_maps_match_explain_grad_cam() -> None:
    """The in-graph CAM is the Grad-CAM of pe.explain.cam (there: upsampled), at feature resolution."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, _, _ = _toy_batch()
    with capture_features(model.gradcam_layer) as feats:
        out = model(x)
    maps = attention_maps(feats.value, out["logit"]).detach()
    assert maps.shape == (8, 8, 8) and maps.dtype == torch.float32
    ref = torch.from_numpy(grad_cam(model, x, model.gradcam_layer, normalise=False))
    up = torch.nn.functional.interpolate(maps[:, None], size=(32, 32), mode="bilinear")[:, 0]
    assert float(maps.amax()) == pytest.approx(1.0) and float(maps.amin()) >= 0
    for i in range(8):  # same map up to the per-map max normalisation: a constant ratio
        keep = up[i] > 1e-3
        if keep.any():
            ratio = ref[i][keep] / up[i][keep]
            assert torch.allclose(ratio, ratio.mean(), rtol=1e-3), i
        else:
            assert float(ref[i].max()) < 1e-6


def test_loss_is_differentiable_through_the_cam() -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    x, masks, _ = _toy_batch()
    loss = _loss(model, x, masks, torch.ones(8, dtype=torch.bool))
    assert loss.dtype == torch.float32 and 0 < float(loss.detach()) <= 1
    loss.backward()
    # The first conv only influences the loss through the double backward of the CAM.
    g = model.features[0].weight.grad
    assert g is not None and float(g.abs().sum()) > 0


def test_optimising_the_attention_loss_lowers_dice_loss() -> None:
    torch.manual_seed(1)
    model = TinyCNN()
    x, masks, y = _toy_batch(n=16)
    annotated = torch.ones(16, dtype=torch.bool)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    bce = nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(40):
        with capture_features(model.gradcam_layer) as feats:
            out = model(x)
        att = attention_loss(feats.value, out["logit"], masks, annotated)
        opt.zero_grad()
        (bce(out["logit"], y) + att).backward()
        opt.step()
        losses.append(float(att.detach()))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses


def test_non_annotated_samples_contribute_nothing() -> None:
    torch.manual_seed(0)
    model = TinyCNN().eval()  # eval: BatchNorm does not couple samples, so subsets are comparable
    x, masks, _ = _toy_batch()
    flags = torch.tensor([True, False] * 4)
    full = _loss(model, x, masks, flags)
    subset = _loss(model, x[flags], masks[flags], torch.ones(4, dtype=torch.bool))
    assert torch.allclose(full, subset, atol=1e-6)
    # Masks of non-annotated samples are ignored; nothing annotated → exactly 0 and no gradient.
    other = masks.clone()
    other[~flags] = 1
    assert torch.allclose(_loss(model, x, other, flags), full, atol=1e-6)
    none = _loss(model, x, masks, torch.zeros(8, dtype=torch.bool))
    assert float(none.detach()) == 0.0
    none.backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.parameters())


def test_lambda_scales_and_zero_switches_off() -> None:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, masks, _ = _toy_batch()
    flags = torch.ones(8, dtype=torch.bool)
    one = _loss(model, x, masks, flags, AttentionLossConfig(lam=1.0))
    half = _loss(model, x, masks, flags, AttentionLossConfig(lam=0.5))
    assert torch.allclose(half, 0.5 * one) and float(_loss(model, x, masks, flags, AttentionLossConfig(lam=0))) == 0


def test_downsampled_mask_keeps_small_lesions_and_is_binary() -> None:
    m = torch.zeros(1, 64, 64)
    m[0, 21:23, 45:47] = 255  # 2×2 lesion, smaller than one 8×8 map cell
    d = downsample_masks(m, (8, 8))
    assert set(d.unique().tolist()) <= {0.0, 1.0}
    assert d[0, 2, 5] == 1  # the cell holding rows 16-23, cols 40-47
    assert 1 <= int(d.sum()) <= 9  # blurred: a little larger than the lesion, never far away
    ys, xs = torch.nonzero(d[0], as_tuple=True)
    assert ys.min() >= 1 and ys.max() <= 3 and xs.min() >= 4 and xs.max() <= 6


def test_continuous_dice_values() -> None:
    m = torch.zeros(3, 4, 4)
    m[:, 1:3, 1:3] = 1
    a = torch.stack([m[0], 0.5 * m[1], torch.zeros(4, 4)])
    loss = continuous_dice_loss(a, m, smooth=1.0)
    # Exact map and half-intensity map both reach cDC = 1 (the c factor); an empty map does not.
    assert torch.allclose(loss[:2], torch.zeros(2), atol=1e-6) and float(loss[2]) == pytest.approx(1 - 1 / 5)
    # Negative slice: zero mask, zero map → no loss; a non-zero map → loss that falls as the map shrinks.
    z = torch.zeros(2, 4, 4)
    mp = torch.zeros(2, 4, 4)
    mp[1, 0, 0] = 1.0
    lz = continuous_dice_loss(mp, z)
    assert float(lz[0]) == 0 and float(lz[1]) == pytest.approx(0.5)


def test_cpu_autocast_and_channels_last() -> None:
    """bf16 autocast (the CPU stand-in for CUDA AMP) and NHWC: finite float32 loss, finite grads."""
    torch.manual_seed(0)
    model = TinyCNN().to(memory_format=torch.channels_last)
    x, masks, _ = _toy_batch()
    x = x.contiguous(memory_format=torch.channels_last)
    with capture_features(model.gradcam_layer) as feats, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    loss = attention_loss(feats.value, out["logit"], masks, torch.ones(8, dtype=torch.bool))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="feature map"):
        attention_maps(torch.zeros(2, 3, requires_grad=True), torch.zeros(2))
    with pytest.raises(ValueError, match="batch sizes"):
        attention_loss(torch.zeros(2, 1, 2, 2), torch.zeros(2), torch.zeros(3, 4, 4), torch.ones(2, dtype=torch.bool))
