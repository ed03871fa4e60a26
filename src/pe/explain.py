"""Explanation maps for the slice CNN and how well they point at emboli.

- :func:`grad_cam`: Grad-CAM as in papers/shi2020_attention_guided_resnet_convlstm.txt, eqs. 1–2:
  the weight of feature map k is the spatial mean of the gradient of the PE logit with respect to
  it (eq. 1); the map is ReLU(Σ_k α_k f^k) (eq. 2), upsampled bilinearly to the input size.
- :func:`integrated_gradients`: the path integral of input gradients from a baseline to the input
  (Sundararajan et al. 2017; used for PE localisation in papers/condrea2024_label_up_weak_segmentation.txt),
  Riemann midpoint rule, summed over input channels, positive evidence only.
- :func:`pointing_game`: a map "hits" when its peak pixel lies inside a true embolus box. The chance
  rate is the share of the map covered by the boxes: a peak placed uniformly at random hits with
  exactly that probability, so accuracy above it means the maps carry localisation information.
- :func:`boxes_to_input_frame`: embolus boxes in original DICOM pixels → the model input frame
  (cache resize, lung crop, resize to the input size), so maps and boxes are compared in one frame.

Maps are float32 numpy arrays (B, H, W) scaled to [0, 1] per map (a map that is 0 everywhere stays 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def _normalise(maps: torch.Tensor) -> np.ndarray:
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
    return _normalise(cam) if normalise else cam.detach().float().cpu().numpy()


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    baseline: torch.Tensor | None = None,
    steps: int = 32,
    batch_size: int = 16,
    logit_fn: Callable[[object], torch.Tensor] = logit_of,
    normalise: bool = True,
) -> np.ndarray:
    """Integrated-gradients maps (B, H, W) of the PE logit for input ``x`` (B, C, H, W).

    attribution = (x − x0) · mean over α of ∂logit/∂x at x0 + α (x − x0), with α at the ``steps``
    midpoints of [0, 1] and x0 = ``baseline`` (zeros by default, i.e. the normalised mean image).
    Summed over channels; only positive evidence for PE is kept, as for Grad-CAM.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = x.detach()
    x0 = torch.zeros_like(x) if baseline is None else baseline.detach().expand_as(x)
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    out = []
    for i in range(x.shape[0]):
        diff = x[i] - x0[i]
        total = torch.zeros_like(diff)
        for a in alphas.split(batch_size):
            path = (x0[i][None] + a[:, None, None, None] * diff[None]).requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(logit_fn(model(path)).sum(), path)
            total += g.sum(dim=0)
        out.append((diff * total / steps).sum(dim=0))
    attr = torch.stack(out).clamp_min(0)
    return _normalise(attr) if normalise else attr.detach().float().cpu().numpy()


# --- pointing game -----------------------------------------------------------------------------


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
    """Pointing-game outcome over n maps: hits, accuracy = hits / n, chance = mean box share."""

    n: int
    hits: int
    accuracy: float
    chance: float

    def summary(self, name: str = "maps") -> str:
        ratio = self.accuracy / self.chance if self.chance > 0 else float("nan")
        return (f"pointing game ({name}): {self.hits}/{self.n} peaks inside an embolus box = "
                f"{self.accuracy:.3f} vs chance {self.chance:.3f} ({ratio:.1f}x)")


def pointing_game(
    maps: Sequence[np.ndarray] | np.ndarray,
    boxes: Sequence[np.ndarray | Sequence[Sequence[float]]],
) -> PointingResult:
    """Share of maps whose peak lies inside one of that map's boxes, and the chance rate.

    ``boxes[i]`` holds the boxes (x0, y0, x1, y1) of map i in the map's pixel frame. Maps without a
    box are an error (the game is only defined where the truth is known); a constant map is a miss.
    """
    if len(maps) != len(boxes):
        raise ValueError(f"{len(maps)} maps but {len(boxes)} box lists")
    if len(maps) == 0:
        raise ValueError("pointing game needs at least one map")
    hits, shares = 0, []
    for i, (m, b) in enumerate(zip(maps, boxes, strict=True)):
        mask = boxes_mask(np.asarray(m).shape, b)
        if not mask.any():
            raise ValueError(f"map {i} has no box inside the frame")
        peak = map_peak(m)
        hits += int(peak is not None and bool(mask[peak]))
        shares.append(float(mask.mean()))
    n = len(maps)
    return PointingResult(n=n, hits=hits, accuracy=hits / n, chance=float(np.mean(shares)))


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
