"""Inference with the ROI crop modes of the CNN (``CNNConfig.crop_mode`` roi_slice | roi_slab | roi_study):
the export of embeddings (:mod:`pe.infer.embeddings`) and the Kaggle kernel (:mod:`pe.infer.kernel`)
call :func:`infer_cropped`, which leaves the lung-box path to :func:`pe.models.slice_cnn.infer_study`
unchanged and runs the ROI modes with the same per-centre crop as training
(:class:`pe.data.slices.SliceDataset`: every neighbour cropped with the centre slice's box).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pe.anatomy.roi import roi_mode, study_roi_boxes
from pe.data.slices import clip_box, crop_resize, n_channels, neighbor_indices
from pe.data.stacking import dedupe_rows, stacked_inputs
from pe.models.slice_cnn import infer_study, preprocess_study, run_batches
from pe.rspect import STUDY

RoiRows = tuple[np.ndarray, np.ndarray, int]  # (boxes (n, 4), found (n,), size of the pixels they are in)


def roi_lookup(cache_dir: Path) -> dict[str, RoiRows]:
    """Study → its CACHE/rois.parquet rows in slice order (boxes, found, size): the ROI crop modes."""
    from pe.data.cache import load_rois

    rois = load_rois(cache_dir).sort_values([STUDY, "slice_index"], kind="stable")
    return {str(study): (g[["x0", "y0", "x1", "y1"]].to_numpy(np.float64), g["found"].to_numpy(bool),
                         int(g["size"].iloc[0]))
            for study, g in rois.groupby(STUDY, sort=False)}


def roi_boxes_of(images: np.ndarray, cfg: Any, rois: RoiRows | None, where: str = "") -> np.ndarray:
    """(n, 4) crop box per centre slice of a study's ``images`` from its ROI rows (``where`` names
    their source in the error when they are missing or do not match the slices)."""
    if rois is None or len(rois[0]) != len(images):
        got = "none" if rois is None else f"{len(rois[0])} rows"
        raise ValueError(f"{where or 'ROI boxes'}: crop_mode={cfg.crop_mode} needs one ROI box per slice; "
                         f"{len(images)} slices, {got}")
    return study_roi_boxes(rois[0], rois[1], cfg, images.shape[1], rois[2])


def study_inputs(images: np.ndarray, cfg: Any, rows: Sequence[int], lung_box: Sequence[float] | None,
                 rois: RoiRows | None, where: str = "") -> tuple[torch.Tensor, list[tuple[int, int, int, int] | None]]:
    """The model inputs of slices ``rows`` of a z-ordered study, cut as the CNN was trained (the lung
    box, or per-centre ROI crops from ``rois`` in the ROI modes), and per row the crop (x0, y0, x1, y1
    in the pixels of ``images``, None: uncropped) its input was cut from, for mapping boxes into it."""
    h, w = images.shape[1], images.shape[2]
    if roi_mode(cfg) is None:
        crop = clip_box(lung_box, h, w) if cfg.crop_lung else None
        return preprocess_study(images, cfg, crop, rows), [crop] * len(rows)
    boxes = roi_boxes_of(images, cfg, rois, where)
    return preprocess_rois(images, cfg, boxes, rows), [clip_box(boxes[int(i)], h, w) for i in rows]


def preprocess_rois(images: np.ndarray, cfg: Any, boxes: np.ndarray, indices: Sequence[int] | None = None,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """:func:`pe.models.slice_cnn.preprocess_study` for the ROI crop modes: input i stacks slice i and
    its neighbours, each cropped with ``boxes[i]`` (:func:`pe.anatomy.roi.study_roi_boxes`, pixels of
    ``images``), resized and normalised — what :class:`pe.data.slices.SliceDataset` feeds in training."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 (n, S, S, 3) slices, got {images.dtype} {images.shape}")
    if len(boxes) != len(images):
        raise ValueError(f"{len(boxes)} ROI boxes for {len(images)} slices")
    idx = list(range(len(images)) if indices is None else indices)
    if not idx:
        return torch.zeros((0, n_channels(cfg.neighbors), cfg.img_size, cfg.img_size), device=device)
    # the same slice with the same box is resized once
    rows = [[(int(k), tuple(float(v) for v in boxes[int(i)]))
             for k in neighbor_indices(int(i), len(images), cfg.neighbors)] for i in idx]
    keys, gather = dedupe_rows(rows)
    slices = [crop_resize(images[k], b, cfg.img_size) for k, b in keys]  # type: ignore[misc]
    return stacked_inputs(slices, gather, device, cfg.channels_last)


def infer_cropped(model: torch.nn.Module, cfg: Any, images: np.ndarray, box: Sequence[float] | None = None,
                  rois: RoiRows | None = None, device: str | torch.device = "cpu", batch_size: int = 64,
                  amp: bool = True, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(probs (n,), embeddings (n, D) float32) of a z-ordered study: ``infer_study`` with the lung
    ``box`` when ``cfg`` does not crop to the ROI, else per-centre ROI crops from ``rois`` (the
    study's stored or recomputed ROI rows; ``where`` names their source in errors)."""
    if roi_mode(cfg) is None:
        return infer_study(model, cfg, images, box=box, device=str(device), batch_size=batch_size, amp=amp)
    boxes = roi_boxes_of(images, cfg, rois, where)
    return run_batches(model, cfg, len(images), lambda rows, dev: preprocess_rois(images, cfg, boxes, rows, dev),
                       device, batch_size, amp)
