"""The training core every trainer shares: seeding, device choice, optimiser, LR schedule, EMA,
AMP settings, checkpoints and the per-epoch JSONL log.

The CNN trainer (:mod:`pe.train.cnn`), the sequence trainer (:mod:`pe.train.seq`) and the trainers
to come (attention, dual hop, 3D student) call these instead of writing their own. What differs
between trainers — the data, the model and the loss — stays with them; a loss is a callable
``loss_fn(batch, outputs) -> tensor`` (see :mod:`pe.train.losses`) so a new term slots in without
touching a loop.

The schedule is one function, :func:`warmup_cosine` (linear warm-up from ``1/warmup`` of the peak,
then a cosine to ``min_ratio`` of it), wrapped in ``LambdaLR``. timm's ``CosineLRScheduler`` was
considered: its warm-up starts at ``warmup_lr_init`` and reaches the peak one step later than ours,
so switching would change every trained model of the demo for no gain; one hand-written formula in
one place is what the refactor asked for.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pe.io import append_jsonl, atomic_path, write_text_atomic


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                   min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step :func:`warmup_cosine` schedule (call ``step()`` after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total, min_ratio))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, decay_1d: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. With ``decay_1d=False`` biases and norm weights (1-d
    tensors) get no weight decay, the usual choice for CNNs."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_1d:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def make_ema(model: nn.Module, enabled: bool, decay: float) -> nn.Module | None:
    """timm's EMA of the weights (``ModelEmaV3``; ``.module`` is the averaged copy), or None."""
    if not enabled:
        return None
    from timm.utils import ModelEmaV3  # timm.utils pulls in much of timm; only EMA runs need it

    return ModelEmaV3(model, decay=decay)


def amp_settings(device: torch.device, amp: bool, amp_dtype: str,
                 cpu_amp: bool = False) -> tuple[bool, torch.dtype]:
    """(autocast enabled, dtype): ``amp`` on CUDA (fp16 needs a GradScaler, bf16 does not);
    ``cpu_amp`` on the CPU, always bf16 (CPU autocast has no use for fp16)."""
    if amp_dtype not in ("fp16", "bf16"):
        raise ValueError(f"amp_dtype must be 'fp16' or 'bf16', got {amp_dtype!r}")
    if device.type == "cpu":
        return cpu_amp, torch.bfloat16
    return device.type == "cuda" and amp, torch.bfloat16 if amp_dtype == "bf16" else torch.float16


def make_scaler(enabled: bool, dtype: torch.dtype) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 autocast (bf16 has fp32's range)."""
    return torch.amp.GradScaler("cuda", enabled=enabled and dtype == torch.float16)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (tensors, numbers, strings, lists and dicts only, so that it loads
    with ``weights_only=True``)."""
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ("model", "config"),
                    what: str = "checkpoint") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` on CPU with a clear error for a missing file or key."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: {what} not found")
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{p}: not a {what} (a {type(ckpt).__name__}, expected a dict)")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise ValueError(f"{p}: not a {what} (no {', '.join(map(repr, missing))})")
    return ckpt


class MetricsLog:
    """``metrics.jsonl`` of a run folder: one JSON object per epoch.

    A fresh run starts an empty log; a resumed one keeps the epochs before the one it restarts at.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def start(self, keep_before_epoch: int = 0) -> None:
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["epoch"] < keep_before_epoch]
        write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))

    def append(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the weights (for best-epoch snapshots and checkpoints)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
