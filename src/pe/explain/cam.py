"""Grad-CAM explanation maps for the slice CNN.

- :func:`grad_cam`: Grad-CAM as in papers/shi2020_attention_guided_resnet_convlstm.txt, eqs. 1–2:
  the weight of feature map k is the spatial mean of the gradient of the PE logit with respect to
  it (eq. 1); the map is ReLU(Σ_k α_k f^k) (eq. 2), upsampled bilinearly to the input size.
- :func:`cam_module`: the layer whose output Grad-CAM reads, by dotted name or the model's ``gradcam_layer``.
Integrated Gradients: :mod:`pe.explain.ig`; the pointing game and box mapping: :mod:`pe.explain.pointing`.

Maps are float32 numpy arrays (B, H, W) scaled to [0, 1] per map (a map that is 0 everywhere stays 0).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def logit_of(output: object) -> torch.Tensor:
    """The PE slice logit, shape (B,), from a model output (a dict with "logit" or a tensor)."""
    if isinstance(output, dict):
        if "logit" not in output:
            raise KeyError(f"model output dict has no 'logit' key (keys: {sorted(output)})")
        output = output["logit"]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"model output must be a tensor or a dict with 'logit', got {type(output).__name__}")
    # A (B, 1) or (B, n_heads) output: the PE head is the first column by convention.
    return output.reshape(output.shape[0], -1)[:, 0]


def normalise_maps(maps: torch.Tensor) -> np.ndarray:
    """Scale each map to [0, 1] by its maximum (all-zero maps stay zero)."""
    flat = maps.reshape(maps.shape[0], -1)
    peak = flat.max(dim=1).values.clamp_min(1e-12)
    return (maps / peak[:, None, None]).detach().float().cpu().numpy()


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    layer: nn.Module,
    logit_fn: Callable[[object], torch.Tensor] = logit_of,
    normalise: bool = True,
) -> np.ndarray:
    """Grad-CAM maps (B, H, W) of the PE logit for input ``x`` (B, C, H, W).

    ``layer`` is the module whose output (B, K, u, v) holds the feature maps f^k (for our CNN:
    ``model.gradcam_layer``, its last convolutional block). The model should be in eval mode so
    that each sample's logit depends on that sample only; gradients of the summed logits then equal
    the per-sample gradients in one backward pass.
    """
    store: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        store["f"] = out

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = logit_fn(model(x))
            if "f" not in store:
                raise RuntimeError("the Grad-CAM layer was not called during the forward pass")
            feats = store["f"]
            if feats.ndim != 4:
                raise ValueError(f"Grad-CAM layer output must be (B, K, u, v), got shape {tuple(feats.shape)}")
            (grads,) = torch.autograd.grad(logits.sum(), feats)
    finally:
        handle.remove()
    alpha = grads.mean(dim=(2, 3), keepdim=True)  # eq. 1: spatially averaged gradients
    cam = F.relu((alpha * feats).sum(dim=1, keepdim=True))  # eq. 2
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam.clamp_min(0)  # bilinear upsampling keeps values >= 0, but guard float noise
    return normalise_maps(cam) if normalise else cam.detach().float().cpu().numpy()


def cam_module(model: nn.Module, name: str | None, where: object) -> nn.Module:
    """The module whose output Grad-CAM uses: ``name`` (a dotted module name, e.g.
    ``backbone.layer3`` for an earlier, finer feature map) or else ``model.gradcam_layer`` (the last
    feature map). ``where`` (a checkpoint or config) names the source in the error."""
    if name:
        try:
            return model.get_submodule(name)
        except AttributeError as e:
            names = [n for n, _ in model.named_modules() if n and n.count(".") <= 2][:40]
            raise ValueError(f"{where}: no module {name!r} in the CNN; e.g. {names}") from e
    layer = getattr(model, "gradcam_layer", None)
    if layer is None:
        raise AttributeError(f"{where}: the CNN has no gradcam_layer attribute")
    return layer
