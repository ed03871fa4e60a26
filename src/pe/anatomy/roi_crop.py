"""Inference with the ROI crop modes of the CNN (``CNNConfig.crop_mode`` roi_slice | roi_slab | roi_study):
the export of embeddings (:mod:`pe.infer.embeddings`) and the Kaggle kernel (:mod:`pe.infer.kernel`)
call :func:`infer_cropped`, which leaves the lung-box path to :func:`pe.models.slice_cnn.infer_study`
unchanged and runs the ROI modes with the same per-centre crop as training
(:class:`pe.data.slices.SliceDataset`: every neighbour cropped with the centre slice's box).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pe.anatomy.roi import roi_mode, study_roi_boxes
from pe.data.slices import crop_resize, n_channels, neighbor_indices, normalize, to_uint8_tensor

RoiRows = tuple[np.ndarray, np.ndarray, int]  # (boxes (n, 4), found (n,), size of the pixels they are in)


def preprocess_rois(images: np.ndarray, cfg: Any, boxes: np.ndarray,
                    indices: Sequence[int] | None = None) -> torch.Tensor:
    """:func:`pe.models.slice_cnn.preprocess_study` for the ROI crop modes: input i stacks slice i and
    its neighbours, each cropped with ``boxes[i]`` (:func:`pe.anatomy.roi.study_roi_boxes`, pixels of
    ``images``), resized and normalised — what :class:`pe.data.slices.SliceDataset` feeds in training."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 (n, S, S, 3) slices, got {images.dtype} {images.shape}")
    if len(boxes) != len(images):
        raise ValueError(f"{len(boxes)} ROI boxes for {len(images)} slices")
    idx = list(range(len(images)) if indices is None else indices)
    if not idx:
        return torch.zeros((0, n_channels(cfg.neighbors), cfg.img_size, cfg.img_size))
    done: dict[tuple[int, tuple[float, ...]], np.ndarray] = {}  # same slice, same box: resized once
    stacks = []
    for i in idx:
        b = tuple(float(v) for v in boxes[int(i)])
        parts = []
        for k in neighbor_indices(int(i), len(images), cfg.neighbors):
            if (int(k), b) not in done:
                done[(int(k), b)] = crop_resize(images[k], b, cfg.img_size)
            parts.append(done[(int(k), b)])
        stacks.append(to_uint8_tensor(np.concatenate(parts, axis=-1)))
    return normalize(torch.stack(stacks))


@torch.inference_mode()
def infer_cropped(model: torch.nn.Module, cfg: Any, images: np.ndarray, box: Sequence[float] | None = None,
                  rois: RoiRows | None = None, device: str | torch.device = "cpu", batch_size: int = 64,
                  amp: bool = True, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(probs (n,), embeddings (n, D) float32) of a z-ordered study: ``infer_study`` with the lung
    ``box`` when ``cfg`` does not crop to the ROI, else per-centre ROI crops from ``rois`` (the
    study's stored or recomputed ROI rows; ``where`` names their source in errors)."""
    from pe.models.slice_cnn import infer_study
    from pe.train.core import amp_settings

    if roi_mode(cfg) is None:
        return infer_study(model, cfg, images, box=box, device=str(device), batch_size=batch_size, amp=amp)
    if rois is None or len(rois[0]) != len(images):
        got = "none" if rois is None else f"{len(rois[0])} rows"
        raise ValueError(f"{where or 'ROI boxes'}: crop_mode={cfg.crop_mode} needs one ROI box per slice; "
                         f"{len(images)} slices, {got}")
    boxes = study_roi_boxes(rois[0], rois[1], cfg, images.shape[1], rois[2])
    model.eval()
    use_amp, amp_dtype = amp_settings(torch.device(device), amp and cfg.amp, cfg.amp_dtype)
    probs, embs = [], []
    for s in range(0, len(images), batch_size):
        x = preprocess_rois(images, cfg, boxes, range(s, min(s + batch_size, len(images)))).to(device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=amp_dtype, enabled=use_amp):
            out = model(x)
        probs.append(torch.sigmoid(out["logit"].float()).cpu().numpy())
        embs.append(out["embedding"].float().cpu().numpy())
    if not probs:
        return np.zeros(0, np.float32), np.zeros((0, getattr(model, "embedding_dim", 0)), np.float32)
    return np.concatenate(probs).astype(np.float32), np.concatenate(embs).astype(np.float32)
