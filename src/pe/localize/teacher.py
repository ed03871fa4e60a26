"""The explainability teacher of condrea2024 (Fig. 2, Algorithm 1): a 2.5D slice classifier plus
captum Integrated Gradients turn image-level labels into 3D pseudo-masks.

For every window (the 2.5D input centred on one slice) the classifier calls positive:
1. IG of the PE logit (captum ``IntegratedGradients``; optional extra noisy references averaged, and
   SmoothGrad noise averaging through ``NoiseTunnel``, the paper's two voting schemes);
2. positive attributions, summed over the channels of each slice offset → a (D, H, W) heatmap
   (D = 2n+1 slices when ``channel_offsets`` is given, else D = 1: everything on the centre slice);
3. hysteresis clustering (:mod:`pe.localize.hysteresis`), thresholds relative to the map's peak;
4. the clusters are filled in the input with a neutral value and the window is classified again;
   repeat until it is negative, ``max_iter`` is reached, or a round finds < ``min_new_voxels`` voxels.
Window masks are then aggregated over the sliding windows with Gaussian(σ = 0.8) weights of the
slice offset, thresholded, labelled in 3D and (optionally) filtered into one pseudo-mask per study.

Neutral fill. The paper zeroes clusters out because its classifier was trained with CutOut holes
of value 0, so a zero hole is in-distribution and carries no PE evidence. The same holds for our
slice CNN: its CoarseDropout fills raw uint8 0 before normalisation, i.e. ``-mean/std`` per channel
after it (:func:`cutout_fill`), which is what to pass as ``fill`` for ``pe.models.slice_cnn``.
The default ``"mean"`` (each channel's mean over the window) is the choice for a classifier that
never saw holes: a flat patch at the image's average level removes the local structure (the
embolus) without adding a bright or dark edge of its own. The IG baseline is the same filled
(constant) image, so attributions measure evidence relative to "nothing here".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from captum.attr import IntegratedGradients, NoiseTunnel
from torch import nn

from pe.explain.cam import logit_of
from pe.localize.clusters import ClusterFilter, filter_clusters, label_clusters
from pe.localize.hysteresis import PAPER_NEIGHBOURHOOD_XYZ, hysteresis_clusters, relative_thresholds


@dataclass
class TeacherConfig:
    """Defaults follow the paper where it gives a value (10 iterations, 50-voxel stop, σ = 0.8)."""

    clf_threshold: float = 0.5  # probability above which a window counts as positive
    ig_steps: int = 32
    n_references: int = 1  # 1: the fill image; k > 1 adds k-1 Gaussian-noise references around it
    reference_noise: float = 0.5  # std of those references' noise, in input units
    smoothgrad_samples: int = 0  # > 0: SmoothGrad averaging over noisy inputs (captum NoiseTunnel)
    smoothgrad_std: float = 0.1
    high: float = 0.5  # hysteresis thresholds as fractions of each heatmap's peak
    low: float = 0.2
    neighbourhood_xyz: tuple[int, int, int] = PAPER_NEIGHBOURHOOD_XYZ
    max_iter: int = 10
    min_new_voxels: int = 50
    fill: str | Sequence[float] = "mean"  # "mean", "zero" or one value per channel (see cutout_fill)
    agg_sigma: float = 0.8
    agg_threshold: float = 0.4  # weighted vote a voxel needs; < 0.5 so two neighbour windows suffice
    batch_size: int = 32
    internal_batch_size: int = 16
    seed: int = 0


def cutout_fill(neighbors: int) -> list[float]:
    """Per-channel normalised value of raw 0 for ``pe.data.slices.normalize`` inputs: the value our
    slice CNN's CoarseDropout holes have, hence an in-distribution "nothing here" for it."""
    from pe.data.slices import IMAGENET_MEAN, IMAGENET_STD

    return np.tile(-IMAGENET_MEAN / IMAGENET_STD, 2 * neighbors + 1).astype(float).tolist()


def slice_offsets(neighbors: int, windows: int = 3) -> np.ndarray:
    """z offset of each channel of a ``pe.data.slices.stack_neighbors`` input: slices are stacked
    slice-major, ``windows`` channels per slice, offsets -n..n."""
    return np.repeat(np.arange(-neighbors, neighbors + 1), windows)


class _Logit(nn.Module):
    """The model as captum wants it: input → PE logit (B,)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logit_of(self.model(x))


def _fill_values(x: torch.Tensor, fill: str | Sequence[float]) -> torch.Tensor:
    """(1, C, 1, 1) fill value per channel for the window ``x`` (1, C, H, W)."""
    c = x.shape[1]
    if isinstance(fill, str):
        if fill == "mean":
            return x.mean(dim=(2, 3), keepdim=True)
        if fill == "zero":
            return torch.zeros((1, c, 1, 1), dtype=x.dtype, device=x.device)
        raise ValueError(f"unknown fill {fill!r}: use 'mean', 'zero' or one value per channel")
    vals = torch.as_tensor(list(fill), dtype=x.dtype, device=x.device)
    if vals.numel() not in (1, c):
        raise ValueError(f"fill has {vals.numel()} values for an input of {c} channels")
    return vals.expand(c).view(1, c, 1, 1).clone()


def _group_index(channel_offsets: np.ndarray | None, n_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (D,), group of each channel (C,)) — one group (offset 0) without offsets."""
    if channel_offsets is None:
        return np.zeros(1, int), np.zeros(n_channels, int)
    off = np.asarray(channel_offsets, int)
    if off.shape != (n_channels,):
        raise ValueError(f"channel_offsets has shape {off.shape}, the input has {n_channels} channels")
    uniq, group = np.unique(off, return_inverse=True)
    return uniq, group


def attribution_heatmap(model: nn.Module, x: torch.Tensor, cfg: TeacherConfig,
                        baseline: torch.Tensor, group: np.ndarray, n_groups: int) -> np.ndarray:
    """(D, H, W) positive IG evidence for the PE logit of one window ``x`` (1, C, H, W), averaged
    over ``cfg.n_references`` references (the baseline plus Gaussian-noise variants) and, when
    ``cfg.smoothgrad_samples`` > 0, over SmoothGrad noise samples; summed per slice-offset group."""
    ig = IntegratedGradients(_Logit(model))
    gen = torch.Generator().manual_seed(cfg.seed)
    base = baseline.expand_as(x)
    total = torch.zeros_like(x)
    for r in range(cfg.n_references):
        ref = base if r == 0 else base + cfg.reference_noise * torch.randn(x.shape, generator=gen).to(x)
        kw = dict(baselines=ref, n_steps=cfg.ig_steps, internal_batch_size=cfg.internal_batch_size)
        if cfg.smoothgrad_samples > 0:
            attr = NoiseTunnel(ig).attribute(x, nt_type="smoothgrad", nt_samples=cfg.smoothgrad_samples,
                                             stdevs=cfg.smoothgrad_std, **kw)
        else:
            attr = ig.attribute(x, **kw)
        total += attr.detach()
    attr = (total / cfg.n_references)[0].float().cpu().numpy()  # (C, H, W)
    heat = np.zeros((n_groups, *attr.shape[1:]), np.float32)
    np.add.at(heat, group, attr)
    return np.clip(heat, 0, None)


@dataclass
class WindowResult:
    """Iterative refinement of one window: ``iterations`` (D, H, W) uint8 holds the round (1..) in
    which each voxel was first clustered (0 = never); ``probs`` the PE probability before each round."""

    iterations: np.ndarray
    probs: list[float]
    stop: str  # "negative", "small" (a round found < min_new_voxels voxels) or "max_iter"

    @property
    def n_rounds(self) -> int:
        """Rounds that ran IG (the last classification of a "negative" stop ran none)."""
        return len(self.probs) - (self.stop == "negative")


@torch.no_grad()
def _prob(model: nn.Module, x: torch.Tensor) -> float:
    return float(torch.sigmoid(logit_of(model(x)).float())[0])


def refine_window(model: nn.Module, x: torch.Tensor, cfg: TeacherConfig,
                  channel_offsets: np.ndarray | None = None) -> WindowResult:
    """Algorithm 1 on one window ``x`` (1, C, H, W): explain, cluster, fill, reclassify."""
    offsets, group = _group_index(channel_offsets, x.shape[1])
    fill = _fill_values(x, cfg.fill)
    cur = x.detach().clone()
    iters = np.zeros((len(offsets), *x.shape[2:]), np.uint8)
    probs: list[float] = []
    stop = "max_iter"
    for it in range(1, cfg.max_iter + 1):
        probs.append(_prob(model, cur))
        if probs[-1] < cfg.clf_threshold:
            stop = "negative"
            break
        heat = attribution_heatmap(model, cur, cfg, fill, group, len(offsets))
        hi, lo = relative_thresholds(heat, cfg.high, cfg.low)
        seg = hysteresis_clusters(heat, hi, lo, cfg.neighbourhood_xyz) > 0
        iters[seg & (iters == 0)] = it
        chan_mask = torch.from_numpy(seg[group]).to(cur.device)[None]  # (1, C, H, W)
        cur = torch.where(chan_mask, fill.expand_as(cur), cur)
        if seg.sum() < cfg.min_new_voxels:
            stop = "small"
            break
    return WindowResult(iterations=iters, probs=probs, stop=stop)


@dataclass
class TeacherResult:
    """Everything the teacher found in one study; :meth:`labels` turns it into a pseudo-mask."""

    probs: np.ndarray  # (N,) PE probability of every window before refinement
    windows: dict[int, WindowResult]  # positive windows only, keyed by centre slice index
    offsets: np.ndarray  # (D,) slice offset of each heatmap plane
    shape: tuple[int, int, int]  # (N, H, W) of the study
    cfg: TeacherConfig = field(repr=False, default_factory=TeacherConfig)
    gate: np.ndarray | None = None  # (N,) bool image labels (label gating): no voxel on a slice labelled negative

    def mask(self, up_to_iter: int | None = None) -> np.ndarray:
        """bool (N, H, W): Gaussian-weighted vote of the windows' masks (rounds <= ``up_to_iter``),
        without the slices the gate labels negative."""
        m = aggregate_windows(self.windows, self.offsets, self.shape, self.cfg.agg_sigma,
                              self.cfg.agg_threshold, up_to_iter)
        return m if self.gate is None else m & np.asarray(self.gate, bool)[:, None, None]

    def labels(self, up_to_iter: int | None = None, flt: ClusterFilter | None = None) -> np.ndarray:
        """int32 (N, H, W) 3D clusters of :meth:`mask`, filtered by ``flt`` when given."""
        lab = label_clusters(self.mask(up_to_iter))
        return filter_clusters(lab, flt) if flt is not None else lab


def aggregate_windows(windows: dict[int, WindowResult], offsets: np.ndarray, shape: Sequence[int],
                      sigma: float, threshold: float, up_to_iter: int | None = None) -> np.ndarray:
    """Every slice's vote is the Gaussian(σ)-weighted mean, over the windows covering it (every
    window of the study, negative ones voting 0), of those windows' masks; offsets beyond the study
    edge land on the edge slice, as in ``pe.data.slices.neighbor_indices``."""
    n = int(shape[0])
    w = np.exp(-0.5 * (np.asarray(offsets, float) / sigma) ** 2)
    weight = np.zeros(n)
    for i in range(n):
        np.add.at(weight, np.clip(i + offsets, 0, n - 1), w)
    vote = np.zeros(tuple(int(s) for s in shape), np.float32)
    for i, res in windows.items():
        it = res.iterations
        m = (it > 0) if up_to_iter is None else ((it > 0) & (it <= up_to_iter))
        for k, o in enumerate(offsets):
            vote[min(max(i + int(o), 0), n - 1)] += w[k] * m[k]
    return vote >= threshold * weight[:, None, None]


@torch.no_grad()
def classify_windows(model: nn.Module, inputs: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """(N,) PE probabilities of the study's windows ``inputs`` (N, C, H, W)."""
    out = [torch.sigmoid(logit_of(model(b)).float()).cpu() for b in inputs.split(batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def windows_to_explain(probs: np.ndarray, threshold: float, gate: np.ndarray | None = None) -> np.ndarray:
    """Indices of the windows the teacher explains: the CNN calls them positive (``probs >= threshold``)
    and, with a ``gate`` (N,) bool (the slices' image labels, label gating), their centre slice is
    labelled positive."""
    keep = np.asarray(probs) >= threshold
    if gate is not None:
        gate = np.asarray(gate, bool)
        if gate.shape != keep.shape:
            raise ValueError(f"gate has {gate.shape[0] if gate.ndim else 0} entries for {keep.shape[0]} windows")
        keep &= gate
    return np.flatnonzero(keep)


def explain_study(model: nn.Module, inputs: torch.Tensor, cfg: TeacherConfig | None = None,
                  channel_offsets: np.ndarray | None = None, progress: bool = False,
                  gate: np.ndarray | None = None) -> TeacherResult:
    """Run the teacher over one study: ``inputs`` (N, C, H, W) are the preprocessed 2.5D windows
    centred on slices 0..N-1 (z order), on the model's device. The model is put in eval mode.
    ``gate`` (N,) bool: explain only windows on slices labelled positive (see :func:`windows_to_explain`)."""
    cfg = cfg or TeacherConfig()
    if inputs.ndim != 4:
        raise ValueError(f"inputs must be (N, C, H, W) windows of one study, got shape {tuple(inputs.shape)}")
    model.eval()
    probs = classify_windows(model, inputs, cfg.batch_size)
    offsets, _ = _group_index(channel_offsets, inputs.shape[1])
    positive = windows_to_explain(probs, cfg.clf_threshold, gate)
    if progress:
        from tqdm.auto import tqdm

        positive = tqdm(positive, desc="teacher windows", leave=False)
    windows = {int(i): refine_window(model, inputs[i:i + 1], cfg, channel_offsets) for i in positive}
    n, _, h, w = inputs.shape
    return TeacherResult(probs=probs, windows=windows, offsets=offsets, shape=(n, h, w), cfg=cfg, gate=gate)
