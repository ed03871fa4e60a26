"""Stage II over spatial feature maps: bidirectional ConvLSTM units (papers/shi2020_attention_guided_resnet_convlstm.txt
section 2.2, after Braman et al. 2018) with the heads the competition needs.

Per slice the input is a reduced feature map (C, k, k) of the stage-I CNN: its last feature map
average-pooled to k x k, then its channels projected by a fixed seeded random orthogonal matrix
(:func:`reduce_feature_maps`, no CNN retraining; see :func:`feature_map_bytes` for why full maps are
out of reach). The export (:mod:`pe.infer.embeddings`) and the kernel (:mod:`pe.infer.kernel`) both get
the maps from one forward hook, :class:`MapCapture`, so they compute the same reduction. The paper's
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pe.models.seq_rnn import cnn_logits
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


# Export defaults: a fixed projection to 64 channels, average-pooled to 8x8, float16, every slice
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


# --------------------------------------------------------------------------------------------
# the fixed map reduction (shared by the export and the kernel)


@dataclass
class MapReduction:
    """How per-slice maps are stored: the CNN's last feature map (in_features, H, W) average-pooled to
    (k, k), its channels projected to ``channels`` by the seeded orthogonal :func:`projection_matrix`
    (kept as is when ``channels >= in_features``), float16; with ``slab_every`` s only slices 0, s, 2s, ...
    are stored and every slice reads its nearest stored one (:func:`slab_rows`)."""

    k: int = DEFAULT_EXPORT["k"]  # type: ignore[assignment]
    channels: int = DEFAULT_EXPORT["channels"]  # type: ignore[assignment]
    seed: int = 0
    slab_every: int = DEFAULT_EXPORT["slab_every"]  # type: ignore[assignment]
    in_features: int = 0  # channels of the CNN's last feature map (0 = not yet known)

    def __post_init__(self) -> None:
        if min(self.k, self.channels, self.slab_every) < 1 or self.in_features < 0:
            raise ValueError(f"map reduction needs k, channels, slab_every >= 1, got {self}")

    @property
    def out_channels(self) -> int:
        return min(self.channels, self.in_features) if self.in_features else self.channels

    def to_json(self) -> dict[str, int]:
        return {key: int(v) for key, v in asdict(self).items()}


def projection_matrix(in_features: int, channels: int, seed: int) -> np.ndarray:
    """(in_features, min(channels, in_features)) float32 with orthonormal columns: the QR factor of a
    seeded Gaussian matrix, signs fixed by diag(R) > 0 (so one seed gives one matrix); the identity when
    no reduction is needed. Stored with the export and in every ConvLSTM checkpoint, so the kernel
    multiplies by the very matrix the export used."""
    if in_features < 1 or channels < 1:
        raise ValueError(f"in_features and channels must be >= 1, got {in_features}, {channels}")
    if channels >= in_features:
        return np.eye(in_features, dtype=np.float32)
    g = np.random.default_rng(seed).standard_normal((in_features, channels))
    q, r = np.linalg.qr(g)
    return (q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]).astype(np.float32)


def reduce_feature_maps(feats: torch.Tensor, projection: torch.Tensor, k: int) -> torch.Tensor:
    """(B, in_features, H, W) feature maps → (B, C, k, k) float32: adaptive average pooling to k x k,
    then the channel projection (in_features, C). Both steps are linear, so the order is free; pooling
    first is the cheap one."""
    if feats.ndim != 4 or feats.shape[1] != projection.shape[0]:
        raise ValueError(f"feature maps {tuple(feats.shape)} do not match a projection of {projection.shape[0]} "
                         f"input channels")
    with torch.autocast(device_type=feats.device.type, enabled=False):  # float32 under AMP too
        x = F.adaptive_avg_pool2d(feats.float(), k)
        return torch.einsum("bchw,cd->bdhw", x, projection.to(device=x.device, dtype=torch.float32))


def slab_rows(n_slices: int, every: int) -> tuple[np.ndarray, np.ndarray]:
    """(stored slice indices 0, every, 2*every, ... (m,), row of the nearest stored slice for each of
    the n slices (n,), ties to the earlier one)."""
    if every < 1:
        raise ValueError(f"slab_every must be >= 1, got {every}")
    stored = np.arange(0, n_slices, every, dtype=np.int64)
    rows = np.minimum((np.arange(n_slices, dtype=np.int64) + (every - 1) // 2) // every, max(len(stored) - 1, 0))
    return stored, rows


class MapCapture:
    """A forward hook on a :class:`pe.models.slice_cnn.SliceCNN`'s ``gradcam_layer`` (an identity on the
    last feature map) that reduces every batch's maps as the CNN runs, once per requested reduction::

        with MapCapture(cnn, {"m": (projection, k)}) as cap:
            probs, emb = infer_cropped(cnn, cfg, images, ...)   # the usual inference, unchanged
        maps = cap.maps("m")   # (n, C, k, k) float16 of every slice, z order
    """

    def __init__(self, model: nn.Module, reductions: dict[str, tuple[torch.Tensor, int]]) -> None:
        self.model = model
        self.reductions = reductions
        self.parts: dict[str, list[np.ndarray]] = {key: [] for key in reductions}
        self.handle: Any = None

    def _hook(self, _module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        for key, (proj, k) in self.reductions.items():
            self.parts[key].append(reduce_feature_maps(out, proj, k).cpu().numpy())

    def __enter__(self) -> MapCapture:
        if self.reductions:
            layer = getattr(self.model, "gradcam_layer", None)
            if layer is None:
                raise ValueError(f"{type(self.model).__name__} has no gradcam_layer to read feature maps from")
            self.handle = layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def maps(self, key: str) -> np.ndarray:
        """(n, C, k, k) float16 (as stored); an error when a value does not fit float16."""
        proj, k = self.reductions[key]
        parts = self.parts[key]
        out = np.concatenate(parts) if parts else np.zeros((0, proj.shape[1], k, k), np.float32)
        out16 = out.astype(np.float16)
        if not np.isfinite(out16).all():
            raise ValueError("reduced feature maps are not finite in float16 (|x| > 65504 or NaN)")
        return out16


# --------------------------------------------------------------------------------------------
# the trained member: input standardisation + ConvLSTM + slab expansion (+ optional CNN skip)


class ConvLSTMMember(nn.Module):
    """What a ConvLSTM stage-2 checkpoint holds: per-channel input standardisation (fitted on the
    training maps), :class:`ConvLSTMSeqModel` over the stored maps, each slice's image logit read from
    its nearest stored map (``rows``) and, with ``cnn_skip``, plus w x logit(CNN slice probability)
    (w starts at 1 and the ConvLSTM's image head at 0, as the BiGRU's ``cnn_skip``). The buffer
    ``projection`` is the export's channel projection, which the kernel reuses."""

    def __init__(self, cfg: ConvLSTMConfig, reduction: MapReduction, cnn_skip: bool = False) -> None:
        super().__init__()
        if not reduction.in_features:
            raise ValueError("the map reduction must know the CNN's feature channels (in_features)")
        self.reduction = reduction
        self.core = ConvLSTMSeqModel(cfg)
        self.register_buffer("in_mean", torch.zeros(cfg.in_channels))
        self.register_buffer("in_std", torch.ones(cfg.in_channels))
        self.register_buffer("projection", torch.from_numpy(
            projection_matrix(reduction.in_features, reduction.channels, reduction.seed)))
        self.cnn_skip = cnn_skip
        if cnn_skip:
            self.skip_w = nn.Parameter(torch.ones(()))
            with torch.no_grad():
                self.core.image_head.weight.zero_()
                self.core.image_head.bias.zero_()

    def set_input_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        with torch.no_grad():
            self.in_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            self.in_std.copy_(torch.as_tensor(np.maximum(std, 1e-6), dtype=torch.float32))

    def forward(self, x: torch.Tensor, map_mask: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
                cnn_logit: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x (B, M, C, k, k) stored maps, map_mask (B, M), rows (B, L) long (stored row of each slice),
        mask (B, L), cnn_logit (B, L) → image_logits (B, L), exam_logits (B, 9), attention (B, M)."""
        x = (x - self.in_mean[:, None, None]) / self.in_std[:, None, None]
        out = self.core(x, map_mask)
        image = torch.gather(out["image_logits"], 1, rows.clamp(min=0))
        if self.cnn_skip:
            if cnn_logit is None:
                raise ValueError("cnn_skip needs the CNN slice logits")
            image = image + self.skip_w * cnn_logit
        return {"image_logits": image.masked_fill(~mask.bool(), 0.0), "exam_logits": out["exam_logits"],
                "attention": out["attention"]}


def core_config(values: dict[str, Any], in_channels: int) -> ConvLSTMConfig:
    """The architecture part of a training config (``pe.config.ConvLSTMSeqConfig`` as a dict)."""
    keys = ("hidden", "kernel", "units", "dropout", "head_dropout", "attn_dim")
    return ConvLSTMConfig(in_channels=in_channels, **{key: values[key] for key in keys if key in values})


def load_convlstm_member(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[ConvLSTMMember, Any]:
    """Rebuild a trained :class:`ConvLSTMMember` (eval mode, on ``device``) and its training config
    (``pe.config.ConvLSTMSeqConfig``) from best.pt (``weights_only=True``)."""
    from pe.config import ConvLSTMSeqConfig, from_dict
    from pe.train.core import load_checkpoint

    path = Path(checkpoint)
    ckpt = load_checkpoint(path, ("model", "config", "reduction"), "ConvLSTM checkpoint")
    if list(ckpt.get("exam_labels", EXAM_LABELS)) != list(EXAM_LABELS):
        raise ValueError(f"{path}: exam head order {ckpt['exam_labels']} differs from pe.rspect.EXAM_LABELS")
    cfg = from_dict(ConvLSTMSeqConfig, ckpt["config"], str(path))
    reduction = MapReduction(**{key: int(v) for key, v in dict(ckpt["reduction"]).items()})
    model = ConvLSTMMember(core_config(dict(ckpt["config"]), reduction.out_channels), reduction, cfg.cnn_skip)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


@torch.no_grad()
def predict_study_maps(model: ConvLSTMMember, maps: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One study from the maps of ALL its slices (n, C, k, k) float16 as :class:`MapCapture` gives them
    (the member's ``slab_every`` picks the stored ones, as the export does) and its CNN slice
    probabilities (n,): (image probabilities (n,), exam probabilities (9,) in EXAM_LABELS order)."""
    model.eval()
    device = model.in_mean.device
    stored, rows = slab_rows(len(maps), model.reduction.slab_every)
    x = torch.from_numpy(np.asarray(maps)[stored].astype(np.float32))[None].to(device)
    logit = torch.from_numpy(cnn_logits(probs))[None].to(device)
    out = model(x, torch.ones(x.shape[:2], dtype=torch.bool, device=device), torch.from_numpy(rows)[None].to(device),
                torch.ones(logit.shape, dtype=torch.bool, device=device), logit)
    return (torch.sigmoid(out["image_logits"][0]).double().cpu().numpy(),
            torch.sigmoid(out["exam_logits"][0]).double().cpu().numpy())


if __name__ == "__main__":
    print(storage_report())
