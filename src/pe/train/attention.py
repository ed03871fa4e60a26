"""Attention supervision of the slice CNN (GAIN_ext, papers/shi2020_attention_guided_resnet_convlstm.txt
section 2.1): L_total = L_CE + λ · L_CDC(A, M).

- A, the attention map, is Grad-CAM of the positive (PE) logit computed *inside* the autograd graph
  (``torch.autograd.grad(..., create_graph=True)``), so the attention loss trains the network:
  α_k = mean_ij ∂g/∂f^k_ij (eq. 1), A = ReLU(Σ_k α_k f^k) (eq. 2), divided by its maximum when that is
  non-zero (a negative slice's map is usually all zero and is left as is), at the resolution of the
  last feature map (the output of ``SliceCNN.gradcam_layer``), or of an earlier block named by the
  config's ``attention_layer`` (e.g. ``backbone.layer3``: twice as fine, less semantic).
- M, the target, is the embolus mask of the centre slice in the model's input frame, downsampled
  bilinearly to the map size and binarised (> 0): slightly larger than the lesion, as in the paper; a
  negative slice's mask is all zero.
- L_CDC is 1 − the continuous Dice coefficient of Shamir et al. 2019 (cDC = 2 Σ m·a / (c Σ m + Σ a),
  c = Σ m·a / Σ m·sign(a), which lets a map below 1 on the lesion still reach cDC = 1), with an
  additive smoothing term so that an all-zero mask gives a usable gradient (see
  :class:`AttentionLossConfig`). Only samples flagged as annotated contribute; the loss is their mean.

Mixed precision: the CAM is computed in float32 from the (possibly fp16/bf16) feature map and its
gradient; the outer ``GradScaler.scale(loss).backward()`` then runs the double backward through the
float32 CAM. channels_last feature maps work unchanged (autograd keeps their layout).

Use :func:`capture_features` around the forward pass to get the feature map the CAM needs::

    with capture_features(raw_model.gradcam_layer) as feats:
        out = model(x)
    loss = ce + cfg.attention_lambda * attention_loss(feats.value, out["logit"], mask, annotated)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionLossConfig:
    """Options of the attention term (the trainer maps CNNConfig.attention_* onto these)."""

    lam: float = 1.0  # λ of eq. 3 (paper: 1.0); 0 switches the term off
    # Additive smoothing of the Dice ratio, in feature-map cells. With ~0 an all-zero mask gives a loss
    # of ≈1 for any non-zero map and no gradient (max normalisation makes Σa ≥ 1); with 1 (the usual
    # Keras Dice smoothing) the negative-slice loss is 1 − 1/(Σa + 1), which pushes the map to zero.
    smooth: float = 1.0


@dataclass
class _Captured:
    value: torch.Tensor | None = None


@contextmanager
def capture_features(layer: nn.Module) -> Iterator[_Captured]:
    """Holds the output of ``layer`` (e.g. ``SliceCNN.gradcam_layer``) of the forward pass run inside
    the ``with`` block, still attached to the graph (``.value``)."""
    box = _Captured()

    def hook(_m: nn.Module, _inp: object, out: object) -> None:
        box.value = out[0] if isinstance(out, (tuple, list)) else out

    handle = layer.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def attention_maps(features: torch.Tensor, logits: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """Float32 Grad-CAM maps (B, u, v) of ``logits`` (B,) with respect to ``features`` (B, K, u, v),
    ReLU'd and divided by each map's maximum when it is non-zero.

    The gradient of the summed logits equals each sample's own gradient because everything after the
    feature map (global pooling, dropout, linear head) acts per sample."""
    if features is None or features.ndim != 4:
        raise ValueError(f"features must be a (B, K, u, v) feature map, got "
                         f"{None if features is None else tuple(features.shape)}")
    if logits.shape != features.shape[:1]:
        raise ValueError(f"logits must be (B,) = ({features.shape[0]},), got {tuple(logits.shape)}")
    if not features.requires_grad:
        raise ValueError("features do not require grad: run the forward pass with autograd enabled")
    (grads,) = torch.autograd.grad(logits.float().sum(), features, create_graph=create_graph)
    alpha = grads.float().mean(dim=(2, 3), keepdim=True)  # eq. 1
    cam = F.relu((alpha * features.float()).sum(dim=1))  # eq. 2
    peak = cam.flatten(1).amax(dim=1)
    return cam / torch.where(peak > 0, peak, torch.ones_like(peak))[:, None, None]


def downsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) masks (any dtype, non-zero = embolus) → float32 (B, u, v) binary masks: antialiased
    bilinear downsampling (a blurred mask: every map cell that sees part of a lesion gets a value
    > 0, so even a lesion smaller than one cell survives), then > 0."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be (B, H, W), got {tuple(masks.shape)}")
    m = (masks != 0).float()[:, None]
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (m[:, 0] > 0).float()


def continuous_dice_loss(maps: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-sample 1 − cDC (Shamir et al. 2019) between maps a ∈ [0, 1] and binary masks m, (B, u, v) → (B,).

    c = Σ m·a / Σ m·sign(a) (1 when the denominator is 0) is treated as a constant: sign() has no
    useful gradient."""
    a, m = maps.flatten(1), masks.flatten(1).to(maps.dtype)
    inter = (a * m).sum(1)
    with torch.no_grad():
        support = (m * (a > 0).to(a.dtype)).sum(1)
        c = torch.where(support > 0, inter / support.clamp_min(1e-12), torch.ones_like(support))
    cdc = (2 * inter + smooth) / (c * m.sum(1) + a.sum(1) + smooth)
    return 1 - cdc


def attention_loss(features: torch.Tensor, logits: torch.Tensor, masks: torch.Tensor, annotated: torch.Tensor,
                   cfg: AttentionLossConfig | None = None) -> torch.Tensor:
    """The attention term λ·mean_{annotated i} L_CDC(A_i, M_i), a float32 scalar in the graph.

    ``features`` (B, K, u, v): the captured ``gradcam_layer`` output (:func:`capture_features`);
    ``logits`` (B,): the PE logits of the same forward pass; ``masks`` (B, H, W): embolus masks in the
    input frame (all zero for negative slices); ``annotated`` (B,) bool: samples whose mask is known.
    A batch without annotated samples gives a zero that is still attached to the graph."""
    cfg = cfg or AttentionLossConfig()
    annotated = annotated.to(device=logits.device, dtype=torch.bool).reshape(-1)
    if annotated.shape[0] != logits.shape[0] or masks.shape[0] != logits.shape[0]:
        raise ValueError(f"batch sizes differ: logits {logits.shape[0]}, masks {masks.shape[0]}, "
                         f"annotated {annotated.shape[0]}")
    if cfg.lam == 0 or not bool(annotated.any()):
        return logits.float().sum() * 0.0
    # Only annotated samples' logits: the CAMs of the others are never built (saves the double backward).
    maps = attention_maps(features, torch.where(annotated, logits, logits.detach() * 0.0))[annotated]
    target = downsample_masks(masks.to(logits.device)[annotated], tuple(maps.shape[-2:]))
    return cfg.lam * continuous_dice_loss(maps, target, cfg.smooth).mean()
