"""Stage II over spatial feature maps: bidirectional ConvLSTM units (papers/shi2020_attention_guided_resnet_convlstm.txt
section 2.2, after Braman et al. 2018) with the heads the competition needs.

Per slice the input is a reduced feature map (C, k, k) of the stage-I CNN (a learned 1x1 projection
and/or pooling to k x k; see :func:`feature_map_bytes` for why full maps are out of reach). The paper's
stack: 2 units, each an ascending then a descending ConvLSTM (96 filters, 3x3, batch norm after each
layer, channel dropout 0.2 on inputs and recurrent states), then 2x2 max pooling. Our heads (as in
:class:`pe.train.seq.SeqModel`, same output keys): a logit per slice from its spatially averaged
features, and nine exam logits from attention-MIL pooling over z (Ilse et al. 2018) concatenated with
masked max pooling.

Padding never changes an output: the descending pass runs each sequence reversed within its own length
(padding stays at the end, after every real slice), batch norm uses statistics of real slices only, and
the pooled heads mask padding out (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pe.rspect import EXAM_LABELS

N_EXAM = len(EXAM_LABELS)
RSPECT_TRAIN_SLICES = 1_790_594  # RSPECT.md: train images
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1}


@dataclass
class ConvLSTMConfig:
    """Architecture of the ConvLSTM stage II (paper defaults where it gives them)."""

    in_channels: int = 64  # C of the stored per-slice maps
    hidden: int = 96  # ConvLSTM filters (paper: 96)
    kernel: int = 3  # (paper: 3x3)
    units: int = 2  # ascending + descending ConvLSTM, then 2x2 max pooling (paper: 2)
    dropout: float = 0.2  # channel dropout on inputs and recurrent states (paper: 0.2)
    head_dropout: float = 0.5  # before the heads (paper: 0.5 before its dense layer)
    attn_dim: int = 64


class ConvLSTMCell(nn.Module):
    """One ConvLSTM step: the four gates from a convolution of [x_t, h_{t-1}] (Xingjian et al. 2015)."""

    def __init__(self, in_ch: int, hidden: int, kernel: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.conv = nn.Conv2d(in_ch + hidden, 4 * hidden, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i, f, o, g = self.conv(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


def _channel_mask(b: int, ch: int, p: float, ref: torch.Tensor, training: bool) -> torch.Tensor | None:
    """One dropout mask per sequence and channel, shared by every z step (variational dropout, as
    Keras' ConvLSTM2D dropout/recurrent_dropout), or None when off."""
    if not training or p <= 0:
        return None
    keep = torch.rand(b, ch, 1, 1, device=ref.device, dtype=ref.dtype) >= p
    return keep.to(ref.dtype) / (1 - p)


class ConvLSTMLayer(nn.Module):
    """A ConvLSTM over z in one direction on (B, L, C, H, W), padding at the end of each sequence."""

    def __init__(self, in_ch: int, hidden: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.cell = ConvLSTMCell(in_ch, hidden, kernel)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _, hh, ww = x.shape
        hid = self.cell.hidden
        h = x.new_zeros(b, hid, hh, ww)
        c = x.new_zeros(b, hid, hh, ww)
        m_in = _channel_mask(b, x.shape[2], self.dropout, x, self.training)
        m_h = _channel_mask(b, hid, self.dropout, x, self.training)
        out = []
        for t in range(length):
            xt = x[:, t] if m_in is None else x[:, t] * m_in
            h, c = self.cell(xt, h if m_h is None else h * m_h, c)
            out.append(h)
        return torch.stack(out, dim=1)


def reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of (B, L, ...) within its own length; padding stays at the end. An
    involution: applying it twice gives x back."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    n = lengths.to(x.device)[:, None]
    idx = torch.where(t < n, n - 1 - t, t)
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


def masked_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BatchNorm2d over the real slices of (B, L, C, H, W) only (padding gets 0)."""
    out = torch.zeros_like(x)
    out[mask] = bn(x[mask])
    return out


class ConvLSTMUnit(nn.Module):
    """Ascending ConvLSTM → BN → descending ConvLSTM → BN → 2x2 max pooling."""

    def __init__(self, in_ch: int, cfg: ConvLSTMConfig) -> None:
        super().__init__()
        self.asc = ConvLSTMLayer(in_ch, cfg.hidden, cfg.kernel, cfg.dropout)
        self.bn_asc = nn.BatchNorm2d(cfg.hidden)
        self.desc = ConvLSTMLayer(cfg.hidden, cfg.hidden, cfg.kernel, cfg.dropout)
        self.bn_desc = nn.BatchNorm2d(cfg.hidden)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = masked_batch_norm(self.bn_asc, self.asc(x), mask)
        h = reverse_within(self.desc(reverse_within(h, lengths)), lengths)
        h = masked_batch_norm(self.bn_desc, h, mask)
        b, length = h.shape[:2]
        h = self.pool(h.flatten(0, 1))
        return h.view(b, length, *h.shape[1:])


class ConvLSTMSeqModel(nn.Module):
    """ConvLSTM units → per-slice head + attention/max pooled exam heads (SeqModel's output keys)."""

    def __init__(self, cfg: ConvLSTMConfig) -> None:
        super().__init__()
        if cfg.units < 1 or cfg.hidden < 1 or cfg.kernel % 2 != 1:
            raise ValueError(f"need units >= 1, hidden >= 1 and an odd kernel, got {cfg}")
        self.cfg = cfg
        self.units = nn.ModuleList(ConvLSTMUnit(cfg.in_channels if i == 0 else cfg.hidden, cfg)
                                   for i in range(cfg.units))
        self.drop = nn.Dropout(cfg.head_dropout)
        self.image_head = nn.Linear(cfg.hidden, 1)
        self.attn_v = nn.Linear(cfg.hidden, cfg.attn_dim)
        self.attn_w = nn.Linear(cfg.attn_dim, 1, bias=False)
        self.exam_head = nn.Linear(2 * cfg.hidden, N_EXAM)

    def set_prior_bias(self, exam_prior: np.ndarray) -> None:
        """Start the exam heads at the training label frequencies (as SeqModel.set_prior_bias)."""
        p = np.clip(np.asarray(exam_prior, dtype=np.float64), 1e-4, 1 - 1e-4)
        with torch.no_grad():
            self.exam_head.bias.copy_(torch.as_tensor(np.log(p / (1 - p)), dtype=self.exam_head.bias.dtype))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, L, C, k, k) padded maps, mask (B, L) bool (True = real slice).

        Returns image_logits (B, L) (0 at padding), exam_logits (B, 9), attention (B, L) (0 at padding).
        """
        if x.ndim != 5 or x.shape[2] != self.cfg.in_channels:
            raise ValueError(f"expected (B, L, {self.cfg.in_channels}, k, k) maps, got {tuple(x.shape)}")
        mask = mask.bool()
        lengths = mask.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("every sequence in a batch needs at least one slice")
        valid = mask[:, :, None, None, None]
        h = x.masked_fill(~valid, 0.0)  # NaN/inf in padding can never reach an output
        for unit in self.units:
            h = unit(h, mask, lengths)
        hseq = self.drop(h.mean(dim=(3, 4))).masked_fill(~mask[..., None], 0.0)  # (B, L, hidden)
        image_logits = self.image_head(hseq).squeeze(-1).masked_fill(~mask, 0.0)
        scores = self.attn_w(torch.tanh(self.attn_v(hseq))).squeeze(-1).masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=1)
        z = torch.bmm(attn.unsqueeze(1), hseq).squeeze(1)
        hmax = hseq.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
        return {"image_logits": image_logits, "exam_logits": self.exam_head(torch.cat([z, hmax], dim=1)),
                "attention": attn}


def feature_map_bytes(n_slices: int, channels: int, k: int, dtype: str = "float16", slab_every: int = 1) -> int:
    """Bytes of stored per-slice maps: ceil(n_slices / slab_every) maps of (channels, k, k) ``dtype``."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if min(n_slices, channels, k, slab_every) < 1:
        raise ValueError("n_slices, channels, k and slab_every must be >= 1")
    return math.ceil(n_slices / slab_every) * channels * k * k * DTYPE_BYTES[dtype]


# Export defaults: a learned 1x1 projection to 64 channels, average-pooled to 8x8, float16, every slice
# (the competition scores every image, so no slab subsampling by default): 14.7 GB for RSPECT train.
DEFAULT_EXPORT = dict(channels=64, k=8, dtype="float16", slab_every=1)
STORAGE_BUDGET_BYTES = 64 * 10**9


def storage_report(n_slices: int = RSPECT_TRAIN_SLICES, **kw: object) -> str:
    """Projected size of the map export for ``n_slices`` (RSPECT train by default), the chosen defaults
    and the paper's full maps, with a verdict against the 64 GB budget."""
    rows = [("defaults", {**DEFAULT_EXPORT, **kw}),
            ("paper full maps (512 ch, 24x24)", dict(channels=512, k=24, dtype="float16", slab_every=1)),
            ("paper, every 4th slice", dict(channels=512, k=24, dtype="float16", slab_every=4))]
    lines = []
    for name, a in rows:
        b = feature_map_bytes(n_slices, **a)  # type: ignore[arg-type]
        fits = "fits" if b <= STORAGE_BUDGET_BYTES else "exceeds"
        lines.append(f"{name}: {n_slices:,} slices x {a['channels']}x{a['k']}x{a['k']} {a['dtype']} every "
                     f"{a['slab_every']}: {b / 1e9:.1f} GB ({fits} 64 GB)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(storage_report())
