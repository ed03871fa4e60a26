"""Integrated Gradients of the PE logit (Sundararajan et al. 2017; used for PE localisation in
papers/condrea2024_label_up_weak_segmentation.txt), computed by captum.

attribution = (x − x0) · mean over α of ∂logit/∂x at x0 + α (x − x0), with α at the ``steps``
midpoints of [0, 1] (captum's ``riemann_middle``) and x0 = ``baseline`` (zeros by default, i.e. the
normalised mean image). Summed over channels; only positive evidence for PE is kept, as for Grad-CAM.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from captum.attr import IntegratedGradients
from torch import nn

from pe.explain.cam import logit_of, normalise_maps


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    baseline: torch.Tensor | None = None,
    steps: int = 32,
    batch_size: int = 16,
    logit_fn: Callable[[object], torch.Tensor] = logit_of,
    normalise: bool = True,
) -> np.ndarray:
    """Integrated-gradients maps (B, H, W) of the PE logit for input ``x`` (B, C, H, W); the path is
    evaluated ``batch_size`` points at a time (``internal_batch_size``)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = x.detach()
    x0 = torch.zeros_like(x) if baseline is None else baseline.detach().expand_as(x)
    ig = IntegratedGradients(lambda inp: logit_fn(model(inp)))
    with torch.enable_grad():
        attr = ig.attribute(x, baselines=x0, n_steps=steps, method="riemann_middle",
                            internal_batch_size=max(1, batch_size))
    attr = attr.sum(dim=1).clamp_min(0)
    return normalise_maps(attr) if normalise else attr.detach().float().cpu().numpy()
