"""The 2.5D slice CNN: config, model, checkpoint loading and whole-study inference.

Public API (used by export, kernel and report stages):

- :class:`CNNConfig` — every option of a CNN experiment (``load_config(CNNConfig, yaml, overrides)``).
- :func:`build_model` — timm backbone with ``in_chans = 3·(2·neighbors+1)``; ``forward(x)`` returns
  ``{"logit": (B,), "embedding": (B, D)}`` plus ``"exam_logits": (B, 9)`` with ``exam_heads``;
  attributes ``embedding_dim`` and ``gradcam_layer`` (an identity on the last feature map).
- :func:`load_cnn` — model and config from a ``best.pt``/``last.pt`` checkpoint.
- :func:`preprocess_study` / :func:`infer_study` — a z-ordered study of 3-window uint8 RGB slices to
  normalised 2.5D tensors / slice probabilities and embeddings; the exact preprocessing of training.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from pe import paths
from pe.config import GLOBAL_POOLS, OUTPUT_STRIDES, CNNConfig, from_dict
from pe.data.slices import crop_resize, n_channels, neighbor_indices
from pe.data.stacking import dedupe_rows, stacked_inputs
from pe.rspect import EXAM_LABELS
from pe.train.core import amp_settings

log = logging.getLogger(__name__)


class SliceCNN(nn.Module):
    """timm backbone → pooled embedding → slice logit (and optional 9 exam logits)."""

    def __init__(self, backbone: nn.Module, embedding_dim: int, exam_heads: bool, drop_rate: float,
                 logit_offset: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        # Identity on the last feature map before pooling: a stable hook point for Grad-CAM that
        # works for every timm architecture (its output IS the final conv feature map).
        self.gradcam_layer = nn.Identity()
        self.embedding_dim = embedding_dim
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(embedding_dim, 1)
        self.exam_head = nn.Linear(embedding_dim, len(EXAM_LABELS)) if exam_heads else None
        # Prior correction: training draws positives pos_oversample times and negatives with
        # probability neg_per_epoch_frac, which multiplies the odds of a positive by their ratio.
        # The head learns those shifted odds (the trainer adds the offset back before the loss);
        # "logit" undoes the shift, so predicted probabilities match the real slice prevalence.
        self.register_buffer("logit_offset", torch.tensor(float(logit_offset)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.gradcam_layer(self.backbone.forward_features(x))
        emb = self.backbone.forward_head(feats, pre_logits=True)
        h = self.dropout(emb)
        out = {"logit": self.head(h).squeeze(1) - self.logit_offset, "embedding": emb}
        if self.exam_head is not None:
            out["exam_logits"] = self.exam_head(h)
        return out


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """A plain backbone state_dict from a raw state_dict, a {"model"/"state_dict": …} dict or one of
    our checkpoints (keys prefixed ``backbone.``/``module.``)."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError("not a state_dict")
    sd = {re.sub(r"^(module\.)?", "", k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def load_pretrained(backbone: nn.Module, path: str | Path, in_chans: int) -> None:
    """Load a local state_dict into a timm backbone: input-conv weights whose channel count
    differs are adapted with timm's ``adapt_input_conv`` (as timm does for its own weights); the
    classifier and other shape mismatches are skipped; most of the backbone must match."""
    from timm.models import adapt_input_conv

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: pretrained weights file not found")
    try:
        sd = _unwrap_state_dict(torch.load(p, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 — any unpickling/format error means a bad file
        raise ValueError(f"{p}: cannot read a state_dict ({e})") from e
    own = backbone.state_dict()
    loaded, skipped = {}, []
    for k, v in sd.items():
        if k not in own:
            continue
        if v.shape == own[k].shape:
            loaded[k] = v
        elif v.ndim == 4 and v.shape[0] == own[k].shape[0] and v.shape[2:] == own[k].shape[2:] \
                and own[k].shape[1] == in_chans:
            loaded[k] = adapt_input_conv(in_chans, v)
        else:
            skipped.append(k)
    if len(loaded) < 0.9 * len(own):
        raise ValueError(f"{p}: only {len(loaded)}/{len(own)} backbone tensors match "
                         f"{type(backbone).__name__}; wrong architecture?")
    missing, _ = backbone.load_state_dict(loaded, strict=False)
    log.info("loaded %d tensors from %s (%d missing, %d shape-skipped)", len(loaded), p, len(missing), len(skipped))


def build_model(cfg: CNNConfig) -> SliceCNN:
    """The slice CNN of ``cfg``: timm ``cfg.backbone`` with ``in_chans = 3·(2·neighbors+1)``."""
    in_chans = n_channels(cfg.neighbors)
    if cfg.init_from and cfg.pretrained_path:
        raise ValueError("init_from and pretrained_path both set: give one source of backbone weights")
    if cfg.init_from:
        cfg = replace(cfg, pretrained_path=str(landmark_backbone_path(cfg.init_from)))
    use_timm_weights = cfg.pretrained and not cfg.pretrained_path
    backbone = create_backbone(cfg, in_chans, use_timm_weights)
    if cfg.pretrained_path:
        load_pretrained(backbone, cfg.pretrained_path, in_chans)
    dim = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
    return SliceCNN(backbone, dim, cfg.exam_heads, cfg.drop_rate, sampling_logit_offset(cfg))


def create_backbone(cfg: CNNConfig, in_chans: int, pretrained: bool = False) -> torch.nn.Module:
    """timm ``cfg.backbone`` without classifier (pooling, drop path, output stride of ``cfg``)."""
    if cfg.global_pool not in GLOBAL_POOLS:  # catavgmax would double the embedding: not supported
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {cfg.global_pool!r}")
    if cfg.output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {cfg.output_stride!r}")
    stride = {"output_stride": cfg.output_stride} if cfg.output_stride != 32 else {}
    try:
        return timm.create_model(cfg.backbone, pretrained=pretrained, in_chans=in_chans, num_classes=0,
                                 drop_path_rate=cfg.drop_path_rate or None, global_pool=cfg.global_pool,
                                 **stride)
    except TypeError as e:  # e.g. MobileNetV3, ViT: no output_stride argument
        if not stride:
            raise
        raise ValueError(f"timm model {cfg.backbone!r} does not take output_stride={cfg.output_stride} "
                         f"(leave it at 32): {e}") from e
    except RuntimeError as e:
        raise RuntimeError(f"timm model {cfg.backbone!r} (pretrained={pretrained}): {e}") from e


def landmark_backbone_path(exp: str) -> Path:
    """``work/models/<exp>/backbone.pt``: the backbone weights 13_pretrain_landmarks.py wrote."""
    p = paths.models_dir() / exp / "backbone.pt"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not found; init_from={exp!r} needs src/13_pretrain_landmarks.py "
                                f"--config ... name={exp} to have run in this work folder")
    return p


def sampling_logit_offset(cfg: CNNConfig) -> float:
    """log of the factor by which epoch sampling multiplies the odds of a positive slice."""
    if cfg.pos_oversample <= 0 or cfg.neg_per_epoch_frac <= 0:
        raise ValueError("pos_oversample and neg_per_epoch_frac must be > 0")
    return math.log(cfg.pos_oversample / min(cfg.neg_per_epoch_frac, 1.0))


def config_from_checkpoint(ckpt: dict[str, Any], source: str) -> CNNConfig:
    cfg = from_dict(CNNConfig, dict(ckpt["config"]), source)
    # The checkpoint holds all weights (hop 1's too): never fetch or read pretrained ones again.
    cfg.pretrained, cfg.pretrained_path, cfg.init_from = False, None, None
    return cfg


def preprocess_study(images: np.ndarray, cfg: CNNConfig, box: Sequence[float] | None = None,
                     indices: Sequence[int] | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """(n, C, img_size, img_size) float32 inputs on ``device`` for the slices ``indices`` (all when None)
    of a z-ordered study ``images`` uint8 (n, S, S, 3): neighbours stacked with edge repetition, cropped
    to ``box`` (x0, y0, x1, y1 in the pixels of ``images``) when ``cfg.crop_lung``, resized, normalised —
    the deterministic part of the training dataset (channels-last memory when ``cfg.channels_last``)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 (n, S, S, 3) slices, got {images.dtype} {images.shape}")
    idx = list(range(len(images)) if indices is None else indices)
    if not idx:
        return torch.zeros((0, n_channels(cfg.neighbors), cfg.img_size, cfg.img_size), device=device)
    use_box = box if cfg.crop_lung else None
    # Crop and resize each needed slice once (a slice is a neighbour of up to 2n+1 inputs).
    keys, gather = dedupe_rows([[int(k) for k in neighbor_indices(int(i), len(images), cfg.neighbors)]
                                for i in idx])
    slices = [crop_resize(images[int(k)], use_box, cfg.img_size) for k in keys]  # type: ignore[call-overload]
    return stacked_inputs(slices, gather, device, cfg.channels_last)


@torch.inference_mode()
def run_batches(model: nn.Module, cfg: CNNConfig, n: int,
                make_inputs: Callable[[range, str | torch.device], torch.Tensor],
                device: str | torch.device = "cpu", batch_size: int = 64,
                amp: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(probs (n,), embeddings (n, D) float32) of ``model`` over inputs ``make_inputs(rows, device)``
    built one batch at a time, so memory stays at one batch even for 1,000-slice studies."""
    model.eval()
    dev = torch.device(device)
    use_amp, amp_dtype = amp_settings(dev, amp and cfg.amp, cfg.amp_dtype, amp and cfg.cpu_amp)
    probs, embs = [], []
    for s in range(0, n, batch_size):
        x = make_inputs(range(s, min(s + batch_size, n)), device)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
            out = model(x)
        probs.append(torch.sigmoid(out["logit"].float()).cpu().numpy())
        embs.append(out["embedding"].float().cpu().numpy())
    if not probs:
        return np.zeros(0, np.float32), np.zeros((0, getattr(model, "embedding_dim", 0)), np.float32)
    return np.concatenate(probs).astype(np.float32), np.concatenate(embs).astype(np.float32)


def infer_study(model: nn.Module, cfg: CNNConfig, images: np.ndarray, box: Sequence[float] | None = None,
                device: str = "cpu", batch_size: int = 64, amp: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(probs (n,), embeddings (n, D) float32) of every slice of a study, in z order; each batch is
    stacked and normalised on ``device`` (:mod:`pe.data.stacking`)."""
    return run_batches(model, cfg, len(images), lambda rows, dev: preprocess_study(images, cfg, box, rows, dev),
                       device, batch_size, amp)
