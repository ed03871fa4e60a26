"""Training and inference of the 3D student on teacher pseudo-masks (condrea2024 Sec. III-C).

- crops of a fixed size (z, y, x), half centred on a pseudo-mask voxel and half on background
  (MONAI ``RandCropByPosNegLabel``, the paper's balanced sampling);
- Generalized Dice loss (MONAI, two softmax classes, computed over the whole batch so crops without
  PE still penalise false positives) and mixup of image and soft mask — both chosen in the paper
  for robustness to noisy labels; by default plus cross-entropy (see ``StudentConfig.loss``);
- AdamW with a linear warm-up and cosine decay;
- whole-volume prediction with MONAI ``sliding_window_inference`` (half-crop step, Gaussian blending
  with σ = 0.25 of the crop as in the paper), then clusters by hysteresis on the PE probability.

Inputs are float32 volumes (z, y, x) already windowed and scaled (the PE window, centre 100 HU,
width 400 HU, mapped to [0, 1]); masks are the pseudo-masks (> 0 = PE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import GeneralizedDiceLoss
from monai.transforms import RandCropByPosNegLabel, SpatialPad
from monai.transforms.utils import map_binary_to_indices
from torch import nn

from pe.localize.clusters import ClusterFilter, filter_clusters
from pe.localize.hysteresis import PAPER_NEIGHBOURHOOD_XYZ, hysteresis_clusters
from pe.models.seg3d import Seg3DConfig, build_seg3d


@dataclass
class StudentConfig:
    """CPU-sized defaults; the paper: crop (64, 128, 128), batch 32, 50,000 iterations, lr 1e-4."""

    crop_zyx: tuple[int, int, int] = (32, 64, 64)
    batch_size: int = 4
    pos_fraction: float = 0.5
    iterations: int = 1200  # stage 12's default (session 23: 1,200 beat 300 on 180 training studies)
    lr: float = 3e-3
    weight_decay: float = 1e-2
    warmup: int = 20
    # "gdl" is the paper's loss; "gdl_ce" (GDL + cross-entropy) is the default because pure GDL had
    # not started to learn after 150 CPU iterations in tests/localize/test_localize_student.py (F1 0.20 vs 0.84).
    loss: str = "gdl_ce"
    mixup_alpha: float = 0.4  # Beta(α, α) mixing weight; 0 turns mixup off
    mixup_p: float = 0.5  # share of batches mixed
    sw_overlap: float = 0.5
    sw_sigma: float = 0.25
    sw_batch_size: int = 4
    high: float = 0.5  # hysteresis on the PE probability
    low: float = 0.3
    neighbourhood_xyz: tuple[int, int, int] = PAPER_NEIGHBOURHOOD_XYZ
    seed: int = 0
    device: str = "cpu"
    # Prior initialisation (Lin et al. 2017, RetinaNet) of a fresh network's output layer: weights N(0, 0.01)
    # and biases (0, logit(prior)), so every seed starts predicting PE with probability ~prior; None keeps
    # MONAI's initialisation, whose starting PE probability depends on the seed (0.45-0.67 at seeds 0-7).
    # Default since session 26: F1 higher at 6 of 8 (CNN, seed) pairs, none lower (README "The student's start").
    prior: float | None = 0.01


def init_output_prior(model: nn.Module, prior: float) -> None:
    """Set the last convolution of ``model`` (two output channels: background, PE) so that the network
    starts predicting PE with probability ~``prior`` everywhere, whatever its random initialisation."""
    if not 0 < prior < 1:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    if not convs or convs[-1].out_channels != 2 or convs[-1].bias is None:
        raise ValueError("prior initialisation needs a last Conv3d with two output channels and a bias")
    out = convs[-1]
    with torch.no_grad():
        nn.init.normal_(out.weight, 0.0, 0.01)
        out.bias.copy_(torch.tensor([0.0, math.log(prior / (1 - prior))]))


def fresh_network(seg_cfg: Seg3DConfig, seed: int, prior: float | None) -> nn.Module:
    """The untrained student network of ``seed`` (torch's global RNG seeded with it, as the training that
    follows relies on), its output layer set to ``prior`` when given (:func:`init_output_prior`)."""
    torch.manual_seed(seed)
    model = build_seg3d(seg_cfg)
    if prior is not None:
        init_output_prior(model, prior)
    return model


class CropSampler:
    """Balanced crops from a list of (volume, mask) pairs; foreground/background voxel indices are
    computed once per volume (MONAI would otherwise rescan the whole volume for every crop)."""

    def __init__(self, volumes: Sequence[np.ndarray], masks: Sequence[np.ndarray], cfg: StudentConfig) -> None:
        if len(volumes) != len(masks) or not volumes:
            raise ValueError(f"need as many masks as volumes (>0), got {len(volumes)} volumes, {len(masks)} masks")
        pad = SpatialPad(spatial_size=cfg.crop_zyx, mode="constant")
        self.items = []
        for i, (v, m) in enumerate(zip(volumes, masks, strict=True)):
            if v.shape != m.shape or v.ndim != 3:
                raise ValueError(f"volume {i}: image {v.shape} and mask {m.shape} must be the same (z, y, x)")
            img = pad(torch.as_tensor(np.asarray(v, np.float32))[None])
            lab = pad(torch.as_tensor((np.asarray(m) > 0).astype(np.float32))[None])
            fg, bg = map_binary_to_indices(lab, None, 0.0)
            self.items.append((img, lab, fg, bg))
        self.crop = RandCropByPosNegLabel(cfg.crop_zyx, pos=cfg.pos_fraction, neg=1 - cfg.pos_fraction,
                                          num_samples=1)
        self.crop.set_random_state(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (n, 1, z, y, x), masks (n, 1, z, y, x)) from randomly chosen volumes."""
        imgs, labs = [], []
        for k in self.rng.integers(0, len(self.items), n):
            img, lab, fg, bg = self.items[k]
            ci = self.crop(img, fg_indices=fg, bg_indices=bg, label=lab)[0]
            cl = self.crop(lab, fg_indices=fg, bg_indices=bg, label=lab, randomize=False)[0]  # same centre
            imgs.append(torch.as_tensor(ci))
            labs.append(torch.as_tensor(cl))
        return torch.stack(imgs).float(), torch.stack(labs).float()


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Convex mix of each sample with a shuffled partner; the mask is mixed with the same weight
    (a soft label), which tempers over-confident noisy pseudo-masks."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], generator=gen)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class _GDLCE(nn.Module):
    """Generalized Dice + cross-entropy (nnU-Net's pairing); torch's cross-entropy takes the soft
    (mixup) targets as class probabilities. The CE gradient does not vanish while the prediction is
    still flat, which Dice's nearly does, so short runs start learning much sooner."""

    def __init__(self) -> None:
        super().__init__()
        self.gdl = GeneralizedDiceLoss(softmax=True, batch=True, soft_label=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.gdl(logits, target) + F.cross_entropy(logits, target)


def _loss(name: str) -> nn.Module:
    """Generalized Dice over the whole batch (soft labels for mixup), optionally plus cross-entropy."""
    if name == "gdl":
        return GeneralizedDiceLoss(softmax=True, batch=True, soft_label=True)
    if name == "gdl_ce":
        return _GDLCE()
    raise ValueError(f"unknown student loss {name!r}: use 'gdl' or 'gdl_ce'")


def train_student(volumes: Sequence[np.ndarray], masks: Sequence[np.ndarray], cfg: StudentConfig | None = None,
                  seg_cfg: Seg3DConfig | None = None, init: dict | None = None) -> tuple[nn.Module, list[float]]:
    """(trained DynUNet in eval mode, loss per iteration) from volumes and their pseudo-masks;
    ``init``: a state dict of the same network to start from (fine-tuning) instead of a fresh one
    (``cfg.prior`` must then be None)."""
    cfg = cfg or StudentConfig()
    if init is not None and cfg.prior is not None:
        raise ValueError("the prior initialisation is for a fresh network; give no prior when fine-tuning (init)")
    seg_cfg = seg_cfg or Seg3DConfig()
    div = seg_cfg.min_crop_divisor()
    if any(c % d for c, d in zip(cfg.crop_zyx, div, strict=True)):
        raise ValueError(f"crop {cfg.crop_zyx} must be a multiple of the network's total stride {div} per axis")
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = CropSampler(volumes, masks, cfg)
    model = fresh_network(seg_cfg, cfg.seed, cfg.prior if init is None else None)  # seeds torch's global RNG
    if init is not None:
        model.load_state_dict(init)
    model = model.to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.iterations))
    loss_fn = _loss(cfg.loss)
    history: list[float] = []
    model.train()
    for _ in range(cfg.iterations):
        x, y = sampler.batch(cfg.batch_size)
        if cfg.mixup_alpha > 0 and float(torch.rand(1, generator=gen)) < cfg.mixup_p:
            x, y = mixup(x, y, cfg.mixup_alpha, gen)
        x, y = x.to(cfg.device), y.to(cfg.device)
        loss = loss_fn(model(x), torch.cat([1 - y, y], dim=1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
    return model.eval(), history


@torch.no_grad()
def predict_volume(model: nn.Module, volume: np.ndarray, cfg: StudentConfig | None = None) -> np.ndarray:
    """float32 PE probability (z, y, x) of a whole volume by Gaussian-blended sliding windows."""
    cfg = cfg or StudentConfig()
    if volume.ndim != 3:
        raise ValueError(f"volume must be (z, y, x), got shape {volume.shape}")
    model.eval()
    x = torch.as_tensor(np.asarray(volume, np.float32))[None, None].to(cfg.device)
    logits = sliding_window_inference(x, cfg.crop_zyx, cfg.sw_batch_size, model, overlap=cfg.sw_overlap,
                                      mode="gaussian", sigma_scale=cfg.sw_sigma)
    return torch.softmax(logits, dim=1)[0, 1].float().cpu().numpy()


def predict_ensemble(members: Sequence[tuple[nn.Module, StudentConfig]], volume: np.ndarray) -> np.ndarray:
    """float32 mean PE probability (z, y, x) of several trained students (e.g. the same recipe at several
    seeds), each predicted with its own sliding-window settings."""
    if not members:
        raise ValueError("an ensemble needs at least one trained student")
    total = np.zeros(volume.shape, np.float64)
    for model, cfg in members:
        total += predict_volume(model, volume, cfg)
    return (total / len(members)).astype(np.float32)


def probability_clusters(prob: np.ndarray, cfg: StudentConfig | None = None,
                         flt: ClusterFilter | None = None) -> np.ndarray:
    """int32 cluster labels (z, y, x): hysteresis on a PE probability (absolute thresholds ``cfg.high`` /
    ``cfg.low``), filtered by ``flt`` when given."""
    cfg = cfg or StudentConfig()
    labels = hysteresis_clusters(prob, cfg.high, cfg.low, cfg.neighbourhood_xyz)
    return filter_clusters(labels, flt) if flt is not None else labels


def predict_clusters(model: nn.Module, volume: np.ndarray, cfg: StudentConfig | None = None,
                     flt: ClusterFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int32 cluster labels (z, y, x), PE probability (z, y, x)) of one student
    (:func:`probability_clusters` of :func:`predict_volume`)."""
    cfg = cfg or StudentConfig()
    prob = predict_volume(model, volume, cfg)
    return probability_clusters(prob, cfg, flt), prob
