"""Embolus annotations for attention training (papers/shi2020_attention_guided_resnet_convlstm.txt 2.1).

Two sources, both keyed by SOPInstanceUID:

- a CSV of boxes ``SOPInstanceUID,x,y,width,height`` in original DICOM pixels (one row per embolus per
  slice): the phantom's ``train_boxes.csv``; RSPECT's public box annotations convert to it;
- a folder of masks ``<SOPInstanceUID>.png`` at the DICOM's size, non-zero = embolus (pseudo-labels).

:meth:`Annotations.input_mask` brings a slice's annotation into the model's input frame exactly as the
image gets there (cache resize, lung crop with the same :func:`pe.data.slices.clip_box`, resize to
``img_size``); :func:`augment_with_mask` then applies the image's own random geometric augmentation to
it (albumentations ``mask=`` target: Affine moves it with nearest-neighbour interpolation; photometric
transforms and CoarseDropout leave it alone).

Sparse annotation as in the paper (1,670 of 5,856 positive studies annotated, one slice about every
10 mm): :func:`select_annotated` keeps ``studies_frac`` of the annotated studies and, in each, the
annotated slices on a z grid of ``every_mm`` (seeded, deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd

from pe.data.slices import SliceTable, clip_box
from pe.data.tables import read_table
from pe.explain.pointing import boxes_mask, boxes_to_input_frame
from pe.rspect import SOP, STUDY

BOX_COLUMNS = (SOP, "x", "y", "width", "height")


def read_boxes(path: str | Path) -> pd.DataFrame:
    """The box CSV, validated: columns BOX_COLUMNS, numeric, width/height > 0."""
    p = Path(path)
    df = read_table(p, BOX_COLUMNS)
    for c in BOX_COLUMNS[1:]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    bad = df[list(BOX_COLUMNS[1:])].isna().any(axis=1) | (df["width"] <= 0) | (df["height"] <= 0)
    if bad.any():
        raise ValueError(f"{p}: {int(bad.sum())} row(s) with a missing/non-numeric value or a non-positive "
                         f"size, e.g. row {int(np.flatnonzero(bad.to_numpy())[0]) + 2}")
    return df[list(BOX_COLUMNS)]


class Annotations:
    """Embolus annotations of a set of slices (boxes or mask files), rasterised on demand."""

    def __init__(self, boxes: pd.DataFrame | None = None, mask_dir: str | Path | None = None) -> None:
        if (boxes is None) == (mask_dir is None):
            raise ValueError("give exactly one of boxes or mask_dir")
        self.mask_dir = Path(mask_dir) if mask_dir is not None else None
        self._boxes: dict[str, np.ndarray] = {}
        if boxes is not None:
            arr = boxes[list(BOX_COLUMNS[1:])].to_numpy(np.float64)
            for sop, idx in boxes.groupby(SOP, sort=False).indices.items():
                self._boxes[str(sop)] = arr[idx]
            self._sops = frozenset(self._boxes)
        else:
            assert self.mask_dir is not None
            if not self.mask_dir.is_dir():
                raise FileNotFoundError(f"{self.mask_dir}: mask folder not found")
            self._sops = frozenset(p.stem for p in self.mask_dir.glob("*.png"))

    @classmethod
    def from_path(cls, path: str | Path) -> Annotations:
        """A box CSV (a file) or a folder of ``<SOPInstanceUID>.png`` masks (a directory)."""
        p = Path(path)
        if p.is_dir():
            return cls(mask_dir=p)
        return cls(boxes=read_boxes(p))

    @property
    def sops(self) -> frozenset[str]:
        """Every SOPInstanceUID with an annotation (an embolus on that slice)."""
        return self._sops

    def original_mask(self, sop: str, original_shape: tuple[int, int]) -> np.ndarray:
        """uint8 (rows, cols) mask in original pixels, 1 = embolus (zeros for an unannotated slice)."""
        rows, cols = original_shape
        if sop not in self._sops:
            return np.zeros((rows, cols), np.uint8)
        if self.mask_dir is None:
            b = self._boxes[sop]
            return boxes_mask((rows, cols), np.c_[b[:, :2], b[:, :2] + b[:, 2:]]).astype(np.uint8)
        path = self.mask_dir / f"{sop}.png"
        m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if m is None:
            raise ValueError(f"{path}: cannot read the mask image")
        if m.ndim == 3:
            m = m.max(axis=2)
        if m.shape != (rows, cols):
            raise ValueError(f"{path}: mask is {m.shape[0]}x{m.shape[1]}, the slice is {rows}x{cols}")
        return (m != 0).astype(np.uint8)

    def input_mask(self, sop: str, original_shape: tuple[int, int], cache_size: int,
                   crop: Sequence[float] | None, img_size: int) -> np.ndarray:
        """uint8 (img_size, img_size) mask, 1 = embolus, in the un-augmented model input frame.

        ``crop``: the lung box (x0, y0, x1, y1) in cache pixels as the dataset uses it
        (``SliceTable.box(code, cache_size)`` when ``crop_lung``, else None); it is clipped exactly as
        :func:`pe.data.slices.crop_resize` clips it. Boxes map geometrically (no resampling loss);
        mask files are resized like the image (area when shrinking) and thresholded at half."""
        frame = clip_box(crop, cache_size, cache_size)
        out = np.zeros((img_size, img_size), np.uint8)
        if sop not in self._sops:
            return out
        if self.mask_dir is None:
            boxes = boxes_to_input_frame(self._boxes[sop], original_shape, cache_size, frame, (img_size, img_size))
            return boxes_mask((img_size, img_size), boxes).astype(np.uint8) if len(boxes) else out
        m = self.original_mask(sop, original_shape).astype(np.float32)
        m = _resize(m, cache_size, cache_size)
        if frame is not None:
            x0, y0, x1, y1 = frame
            m = m[y0:y1, x0:x1]
        return (_resize(m, img_size, img_size) >= 0.5).astype(np.uint8)


def _resize(m: np.ndarray, h: int, w: int) -> np.ndarray:
    if m.shape == (h, w):
        return m
    shrink = m.shape[0] > h or m.shape[1] > w
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def augment_with_mask(aug: A.Compose | None, image: np.ndarray, mask: np.ndarray,
                      seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) after the same random augmentation; the image is identical to
    ``aug(image=image)`` under the same seed (tested), so the dataset can always pass a mask.

    ``seed``: the per-sample augmentation seed of :class:`pe.data.slices.EpochBatchSampler`."""
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape[:2]} differ in size")
    if aug is None:
        return image, mask
    if seed is not None:
        aug.set_random_seed(int(seed))
    out = aug(image=image, mask=mask)
    return out["image"], out["mask"]


def select_annotated(meta: pd.DataFrame, annotated_sops: Sequence[str] | frozenset[str] | set[str],
                     studies_frac: float = 1.0, every_mm: float = 0.0, seed: int = 0) -> set[str]:
    """The SOPs whose annotation training may use, a deterministic function of its arguments.

    ``meta``: one row per slice with StudyInstanceUID, SOPInstanceUID and z (stage-01 metadata).
    Annotated studies are those with at least one slice in ``annotated_sops``; ``round(studies_frac·n)``
    of them are kept (at least one when ``studies_frac > 0``). In each kept study, slices lie on a z grid
    with a step of ``round(every_mm / slice spacing)`` slices (spacing = median z step) from a random
    offset, like a radiologist outlining one slice about every ``every_mm`` (0 = every slice); the
    annotated slices on the grid are returned."""
    if not 0.0 <= studies_frac <= 1.0:
        raise ValueError(f"studies_frac must be in [0, 1], got {studies_frac}")
    if every_mm < 0:
        raise ValueError(f"every_mm must be >= 0, got {every_mm}")
    missing = [c for c in (STUDY, SOP, "z") if c not in meta.columns]
    if missing:
        raise ValueError(f"metadata: missing column(s) {missing}")
    ann = set(map(str, annotated_sops))
    has = meta[meta[SOP].astype(str).isin(ann)]
    studies = np.array(sorted(has[STUDY].astype(str).unique()))
    rng = np.random.default_rng([seed, 2020])
    k = int(round(studies_frac * len(studies)))
    if studies_frac > 0 and len(studies):
        k = max(k, 1)
    chosen = set(rng.choice(studies, size=k, replace=False).tolist()) if k else set()
    out: set[str] = set()
    for _, g in meta[meta[STUDY].astype(str).isin(chosen)].groupby(STUDY, sort=True):
        g = g.sort_values("z")
        z = g["z"].to_numpy(np.float64)
        spacing = float(np.median(np.diff(z))) if len(z) > 1 else 1.0
        step = max(1, int(round(every_mm / spacing))) if every_mm > 0 and spacing > 0 else 1
        offset = int(rng.integers(step))  # studies in sorted order: one stream, deterministic
        sops = g[SOP].astype(str).to_numpy()[offset::step]
        out.update(s for s in sops if s in ann)
    return out


def annotated_flags(labels: np.ndarray, sops: np.ndarray, selected: set[str] | frozenset[str],
                    negatives: bool = True) -> np.ndarray:
    """Bool (n,): which samples carry a known mask. A slice labelled negative has a known all-zero
    mask (the paper trains every negative with one) when ``negatives``; a positive slice only when
    its SOP was selected (:func:`select_annotated`)."""
    lab = np.asarray(labels, dtype=np.float32)
    sel = np.fromiter((str(s) in selected for s in sops), dtype=bool, count=len(sops))
    return sel | ((lab < 0.5) & negatives)


@dataclass
class SampleMasks:
    """What a :class:`pe.data.slices.SliceDataset` needs to return each sample's embolus mask in its
    input frame: the annotations, which samples carry a known mask (:func:`annotated_flags`) and each
    sample's original (Rows, Columns)."""

    annotations: Annotations
    annotated: np.ndarray  # (n,) bool, per sample of the table
    shapes: np.ndarray  # (n, 2) int, original rows, columns per sample

    def mask(self, table: SliceTable, i: int, crop_lung: bool, img_size: int) -> np.ndarray:
        """uint8 (img_size, img_size) un-augmented mask of sample ``i`` (zeros unless annotated)."""
        if not self.annotated[i]:
            return np.zeros((img_size, img_size), np.uint8)
        code = int(table.sample_study[i])
        size = int(table.box_size[code])
        crop = table.box(code, size) if crop_lung and size > 0 else None
        # without a crop the cache size cancels out (original -> cache -> input is one scaling)
        rows, cols = (int(v) for v in self.shapes[i])
        return self.annotations.input_mask(str(table.sample_sop[i]), (rows, cols), size if crop else img_size,
                                           crop, img_size)


def sample_masks(table: SliceTable, meta: pd.DataFrame, source: str | Path, studies_frac: float = 1.0,
                 every_mm: float = 0.0, negatives: bool = True, seed: int = 0) -> SampleMasks:
    """:class:`SampleMasks` of ``table``'s samples: annotations from ``source`` (box CSV or mask folder),
    thinned by :func:`select_annotated` (``meta``: stage-01 metadata with z, rows, columns)."""
    ann = Annotations.from_path(source)
    missing = [c for c in (SOP, "rows", "columns") if c not in meta.columns]
    if missing:
        raise ValueError(f"metadata: missing column(s) {missing}")
    rows = meta.drop_duplicates(SOP).set_index(meta.drop_duplicates(SOP)[SOP].astype(str))
    shapes = rows.reindex(table.sample_sop.astype(str))[["rows", "columns"]].to_numpy()
    if np.isnan(shapes.astype(np.float64)).any():
        raise ValueError("metadata: some training slices have no rows/columns")
    selected = select_annotated(meta[meta[STUDY].isin(set(table.studies))], ann.sops, studies_frac, every_mm, seed)
    flags = annotated_flags(table.label, table.sample_sop, selected, negatives)
    return SampleMasks(ann, flags, shapes.astype(np.int64))
