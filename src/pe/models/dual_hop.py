"""The dual-hop slice model of papers/condrea2023_anatomically_aware_dual_hop.txt (Fig. 5, eq. 7).

Hop 1 is a trained slice CNN, frozen (weights and BatchNorm statistics: it always runs in eval mode
and without gradients). Its multi-level feature maps (timm ``forward_intermediates``, the
maps ``features_only`` would give, without a second copy of the weights) go through an
aggregator, U-Net-like: from the deepest level up, each block is conv-BN-ReLU ×2 and an upsampling to
the next shallower level's size, concatenated with that level's features; the last block brings the
channels down to the input's and the size back to the input's (the paper: 6 blocks, channels
[1280, 224, 96, 64, 32, 9] for EfficientNetV2-L). Hop 2, the same architecture with new weights and
``in_chans`` doubled, reads the input concatenated with the aggregate and returns what
:class:`pe.models.slice_cnn.SliceCNN` returns (``{"logit", "embedding"}``), so training, export and
the kernel treat a dual-hop model as any slice CNN. Sizes are matched by interpolation to the
feature maps' actual sizes, so odd input sizes work too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from pe import paths
from pe.config import CNNConfig
from pe.data.slices import n_channels
from pe.models.slice_cnn import SliceCNN, build_model, create_backbone, sampling_logit_offset
from pe.train.core import load_checkpoint


class UpBlock(nn.Module):
    """conv3x3-BN-ReLU ×2, then bilinear resize to a given size (the paper's upsample block)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.body(x), size=size, mode="bilinear", align_corners=False)


class Aggregator(nn.Module):
    """Feature maps (shallow → deep, channels ``feat_channels``) → (B, out_ch, H, W) at input size."""

    def __init__(self, feat_channels: list[int], out_ch: int) -> None:
        super().__init__()
        if not feat_channels:
            raise ValueError("aggregator needs at least one feature level")
        chans = list(feat_channels)
        blocks = []
        incoming = 0
        for lvl in range(len(chans) - 1, -1, -1):  # deepest first
            out = chans[lvl - 1] if lvl > 0 else out_ch
            blocks.append(UpBlock(chans[lvl] + incoming, out))
            incoming = out
        self.blocks = nn.ModuleList(blocks)

    def forward(self, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = None
        for j, lvl in enumerate(range(len(feats) - 1, -1, -1)):
            f = feats[lvl]
            x = f if x is None else torch.cat([x, f], dim=1)
            target = tuple(feats[lvl - 1].shape[-2:]) if lvl > 0 else size
            x = self.blocks[j](x, target)
        assert x is not None
        return x


class DualHop(nn.Module):
    """Frozen hop 1 (a :class:`SliceCNN`) → aggregator → hop 2 (SliceCNN on input ⊕ aggregate)."""

    def __init__(self, hop1: SliceCNN, hop2: SliceCNN, in_chans: int) -> None:
        super().__init__()
        if not hasattr(hop1.backbone, "forward_intermediates"):
            raise ValueError(f"{type(hop1.backbone).__name__} has no forward_intermediates: not a supported hop 1")
        self.hop1 = hop1
        for p in self.hop1.parameters():
            p.requires_grad_(False)
        chans = [int(d["num_chs"]) for d in hop1.backbone.feature_info]
        self.aggregator = Aggregator(chans, in_chans)
        self.hop2 = hop2
        self.embedding_dim = hop2.embedding_dim
        self.gradcam_layer = hop2.gradcam_layer

    @property
    def backbone(self) -> nn.Module:
        """Hop 2's encoder: the one whose features stage 2 and the explainers read."""
        return self.hop2.backbone

    @property
    def logit_offset(self) -> torch.Tensor:
        return self.hop2.logit_offset
        self.hop1.eval()

    def train(self, mode: bool = True) -> DualHop:
        """Hop 1 stays in eval mode: its BatchNorm statistics must not move while hop 2 trains."""
        super().train(mode)
        self.hop1.eval()
        return self

    def hop1_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Hop 1's feature maps, shallow to deep (timm ``forward_intermediates``), without gradients."""
        with torch.no_grad():
            return list(self.hop1.backbone.forward_intermediates(x, intermediates_only=True))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        agg = self.aggregator(self.hop1_features(x), (int(x.shape[-2]), int(x.shape[-1])))
        return self.hop2(torch.cat([x, agg], dim=1))


def _init_hop2(backbone: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Hop 2 starts as hop 1 (paper: both encoders from the best weights): equal shapes copy; the
    input conv gets hop 1's kernel on the original channels and zeros on the added ones, so hop 2's
    first prediction equals hop 1's."""
    own = backbone.state_dict()
    new = {}
    for k, v in state.items():
        if not k.startswith("backbone.") or k[len("backbone."):] not in own:
            continue
        k = k[len("backbone."):]
        if v.shape == own[k].shape:
            new[k] = v
        elif v.ndim == 4 and v.shape[0] == own[k].shape[0] and own[k].shape[1] == 2 * v.shape[1]:
            new[k] = torch.cat([v, torch.zeros_like(v)], dim=1)
    backbone.load_state_dict(new, strict=False)


def build_dual_hop(cfg: CNNConfig, hop1_state: Mapping[str, torch.Tensor] | None = None,
                   init_hop2_from_hop1: bool = True) -> DualHop:
    """A dual-hop model of ``cfg.backbone``. ``hop1_state``: the trained slice CNN's state_dict
    (``checkpoint["model"]`` of stage 04, ``module.`` prefixes allowed); None leaves hop 1 random
    (tests only). Hop 2 starts from hop 1's weights unless ``init_hop2_from_hop1`` is False."""
    # all weights come from hop1_state (hop 2 starts as hop 1, as in the paper)
    cfg = replace(cfg, pretrained=False, pretrained_path=None, init_from=None)
    hop1 = build_model(cfg)
    state = None
    if hop1_state is not None:
        state = {k.removeprefix("module."): v for k, v in hop1_state.items()}
        hop1.load_state_dict(state)
    in_chans = n_channels(cfg.neighbors)
    backbone = create_backbone(cfg, 2 * in_chans)
    dim = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
    hop2 = SliceCNN(backbone, dim, cfg.exam_heads, cfg.drop_rate, sampling_logit_offset(cfg))
    if state is not None and init_hop2_from_hop1:
        _init_hop2(backbone, state)
        heads = hop2.state_dict()
        hop2.load_state_dict({k: v for k, v in state.items() if not k.startswith("backbone.")
                              and k in heads and v.shape == heads[k].shape}, strict=False)
    return DualHop(hop1.eval(), hop2, in_chans)


HOP_INPUT_KEYS: tuple[str, ...] = ("backbone", "neighbors", "img_size", "crop_lung", "crop_mode", "crop_roi_slab")


def build_training_model(cfg: CNNConfig, fold: int) -> nn.Module:
    """The model stage 04 trains for ``cfg``: a :class:`SliceCNN`, or with ``cfg.hop1_exp`` a
    :class:`DualHop` whose hop 1 is ``best.pt`` of experiment ``hop1_exp`` for the same ``fold`` (so
    hop 1 never saw the fold's validation studies either). Both hops must see the same input."""
    if not cfg.hop1_exp:
        return build_model(cfg)
    if cfg.hop1_exp == cfg.name:
        raise ValueError(f"hop1_exp={cfg.hop1_exp!r} is this experiment's own name; give the hop-1 experiment")
    p = paths.run_dir(cfg.hop1_exp, fold) / "best.pt"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not found; hop1_exp={cfg.hop1_exp!r} needs src/04_train_cnn.py to have "
                                f"trained that experiment for fold {fold} first")
    ckpt = load_checkpoint(p, ("model", "config"), "hop-1 CNN checkpoint")
    h = dict(ckpt["config"])
    for key in HOP_INPUT_KEYS:
        if h.get(key) != getattr(cfg, key):
            raise ValueError(f"{p}: hop 1 has {key}={h.get(key)!r}, this experiment {getattr(cfg, key)!r}; "
                             "the two hops must see the same input")
    if cfg.hop1_exp and h.get("hop1_exp"):
        raise ValueError(f"{p}: hop 1 is itself a dual-hop model; only two hops are supported")
    return build_dual_hop(cfg, ckpt["model"])
