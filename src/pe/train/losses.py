"""Losses as pluggable pieces: a trainer calls ``loss_fn(batch, outputs) -> scalar tensor`` and
knows nothing else about them, so a new term (the attention loss of shi2020, the segmentation losses
of the 3D student) is added by composing callables, not by editing a loop.

- :class:`SliceLoss`: the 2.5D CNN's loss (slice BCE or focal, plus the optional exam-head BCE).
- :class:`AttentionSliceLoss`: a CNN loss plus the shi2020 attention term (:mod:`pe.train.attention`).
- :func:`pe.eval.metric.torch_metric_loss`: the sequence stage's loss, the competition metric itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from pe.config import CNNConfig
from pe.rspect import EXAM_LABELS, NEGATIVE_LABELS
from pe.train.attention import AttentionLossConfig, attention_loss

LossFn = Callable[[dict[str, Any], dict[str, torch.Tensor]], torch.Tensor]

POSITIVE_ONLY_MASK = torch.tensor([lab not in NEGATIVE_LABELS for lab in EXAM_LABELS])


def slice_loss(logit: torch.Tensor, target: torch.Tensor, cfg: CNNConfig) -> torch.Tensor:
    """Mean BCE (with ``pos_weight``) or sigmoid focal loss of the slice logits."""
    if cfg.loss == "focal":
        return sigmoid_focal_loss(logit, target, alpha=-1, gamma=cfg.focal_gamma, reduction="mean")
    if cfg.loss != "bce":
        raise ValueError(f"loss must be 'bce' or 'focal', got {cfg.loss!r}")
    pw = torch.tensor(cfg.pos_weight, device=logit.device) if cfg.pos_weight != 1.0 else None
    return F.binary_cross_entropy_with_logits(logit, target, pos_weight=pw)


def exam_loss(exam_logits: torch.Tensor, exam: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """BCE of the slice-level exam heads. negative_exam_for_pe and indeterminate are learnt on every
    slice; the seven positive-only labels only on positive slices, where the label describes the clot
    the slice shows (on a negative slice of a positive study they would be noise)."""
    mask = torch.ones_like(exam, dtype=torch.bool)
    mask[:, POSITIVE_ONLY_MASK.to(exam.device)] = (label > 0.5).unsqueeze(1)
    mask &= ~torch.isnan(exam)
    bce = F.binary_cross_entropy_with_logits(exam_logits.float(), torch.nan_to_num(exam), reduction="none")
    return (bce * mask).sum() / mask.sum().clamp(min=1)


class SliceLoss:
    """The CNN's loss: :func:`slice_loss` on ``logit + logit_offset`` (the resampled epoch's odds,
    see ``SliceCNN.logit_offset``), plus ``exam_loss_weight`` × :func:`exam_loss` with exam heads.

    ``batch`` holds ``label`` (B,) and, with exam heads, ``exam`` (B, 9) on the model's device.
    """

    def __init__(self, cfg: CNNConfig, logit_offset: float = 0.0) -> None:
        self.cfg, self.logit_offset = cfg, logit_offset

    def __call__(self, batch: dict[str, Any], out: dict[str, torch.Tensor]) -> torch.Tensor:
        y = batch["label"]
        loss = slice_loss(out["logit"].float() + self.logit_offset, y, self.cfg)
        if "exam_logits" in out:
            loss = loss + self.cfg.exam_loss_weight * exam_loss(out["exam_logits"], batch["exam"], y)
        return loss


class AttentionSliceLoss:
    """``base(batch, out) + λ · L_CDC`` (GAIN_ext, papers/shi2020 section 2.1): ``out`` also holds
    ``features``, the captured ``gradcam_layer`` (or ``attention_layer``) output of the same forward pass, and ``batch`` holds
    ``mask`` (B, H, W) and ``annotated`` (B,) from the dataset. ``last`` keeps the two terms of the
    latest call (floats) for the training log."""

    def __init__(self, base: LossFn, cfg: AttentionLossConfig) -> None:
        self.base, self.cfg = base, cfg
        self.last: tuple[float, float] = (0.0, 0.0)

    def __call__(self, batch: dict[str, Any], out: dict[str, torch.Tensor]) -> torch.Tensor:
        for key, where in (("features", out), ("mask", batch), ("annotated", batch)):
            if key not in where:
                raise KeyError(f"attention loss needs {key!r} (capture_features / a dataset with masks)")
        loss = self.base(batch, out)
        att = attention_loss(out["features"], out["logit"], batch["mask"], batch["annotated"], self.cfg)
        self.last = (float(loss.detach()), float(att.detach()))
        return loss + att


def build_cnn_loss(cfg: CNNConfig, logit_offset: float) -> LossFn:
    """The CNN's loss for ``cfg``: :class:`SliceLoss`, wrapped in :class:`AttentionSliceLoss` when
    ``attention_lambda > 0``."""
    base = SliceLoss(cfg, logit_offset)
    if cfg.attention_lambda <= 0:
        return base
    return AttentionSliceLoss(base, AttentionLossConfig(lam=cfg.attention_lambda, smooth=cfg.attention_smooth))
