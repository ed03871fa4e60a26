"""Loading a stage-04 checkpoint as the model it was trained as: a :class:`pe.models.slice_cnn.SliceCNN`
or, for an experiment with ``hop1_exp``, a :class:`pe.models.dual_hop.DualHop` (both hops are in its
``best.pt``). Export, kernel, explainers and the localisation stages load CNNs through here."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from pe.config import CNNConfig
from pe.models.dual_hop import build_dual_hop
from pe.models.slice_cnn import build_model, config_from_checkpoint
from pe.train.core import load_checkpoint

# the weights a stage-04 checkpoint holds: what to predict with (EMA when on), and the optimiser's raw ones
CNN_WEIGHTS: tuple[str, ...] = ("model", "train_model")


def load_cnn(checkpoint: Path, device: str = "cpu", weights: str = "model") -> tuple[nn.Module, CNNConfig]:
    """Model (eval mode, on ``device``) and config from a checkpoint. ``weights``: ``"model"``, the
    weights to predict with (the EMA weights when EMA was on), or ``"train_model"``, the raw weights
    the optimiser trained (stored beside them when EMA was on; for diagnostics such as
    bench/compare_cams.py)."""
    p = Path(checkpoint)
    if weights not in CNN_WEIGHTS:
        raise ValueError(f"weights must be one of {CNN_WEIGHTS}, got {weights!r}")
    ckpt = load_checkpoint(p, (weights, "config"), "CNN checkpoint")
    cfg = config_from_checkpoint(ckpt, str(p))
    # a dual-hop experiment is one model to export and the kernel: both hops inside
    model = build_dual_hop(cfg, None, init_hop2_from_hop1=False) if cfg.hop1_exp else build_model(cfg)
    model.load_state_dict({re.sub(r"^module\.", "", k): v for k, v in ckpt[weights].items()})
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), cfg
