"""The 3D segmentation student of condrea2024 (Sec. III-C): a MONAI DynUNet, the nnU-Net-like
network the paper used. Volumes are (z, y, x), so tensors are (B, C, z, y, x); the paper's crop
(128, 128, 64) (x, y, z) is (64, 128, 128) here.

Two output channels (background, PE) with a softmax, so the Generalized Dice loss can weight the
two classes by inverse squared volume (Sudre et al. 2017) — with one channel it reduces to Dice.
"""

from __future__ import annotations

from dataclasses import dataclass

from monai.networks.nets import DynUNet
from torch import nn


@dataclass
class Seg3DConfig:
    """Small defaults for the CPU; the paper's scale is filters (32, 64, 128, 256, 320) on 64x128x128.
    ``strides[0]`` is the stem (1 = full resolution); z is pooled later than (y, x) because CT
    slices are thicker than pixels and crops are shallow in z."""

    in_channels: int = 1
    out_channels: int = 2
    filters: tuple[int, ...] = (8, 16, 32)
    strides: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 2, 2), (2, 2, 2))
    # In-plane kernels at full resolution (nnU-Net's choice for anisotropic data; also 3x cheaper
    # where the convolutions cost most), 3x3x3 once the levels have pooled.
    kernels: tuple[tuple[int, int, int], ...] = ((1, 3, 3), (3, 3, 3), (3, 3, 3))
    norm: str = "instance"
    res_block: bool = True

    def min_crop_divisor(self) -> tuple[int, int, int]:
        """Each crop side must be a multiple of the product of the strides along it."""
        out = [1, 1, 1]
        for s in self.strides:
            out = [o * k for o, k in zip(out, s, strict=True)]
        return out[0], out[1], out[2]


def build_seg3d(cfg: Seg3DConfig | None = None) -> nn.Module:
    """A DynUNet with one level per stride (deep supervision off: the student's labels are noisy
    pseudo-masks and the coarse heads add little at this scale)."""
    cfg = cfg or Seg3DConfig()
    if not len(cfg.filters) == len(cfg.strides) == len(cfg.kernels):
        raise ValueError(f"need one filter count, stride and kernel per level: {len(cfg.filters)} filters, "
                         f"{len(cfg.strides)} strides, {len(cfg.kernels)} kernels")
    return DynUNet(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        kernel_size=[list(k) for k in cfg.kernels],
        strides=[list(s) for s in cfg.strides],
        upsample_kernel_size=[list(s) for s in cfg.strides[1:]],
        filters=list(cfg.filters),
        norm_name=cfg.norm,
        res_block=cfg.res_block,
    )
