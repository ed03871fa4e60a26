"""Where the localisation stages read studies from and in which pixel frame they work.

Every localisation volume (teacher pseudo-mask, student prediction, box truth) lives in the *cache
frame*: (n_slices in z order, S, S) with S the JPEG cache size of stage 02, so they compare voxel for
voxel. The slice CNN sees the lung crop resized to ``img_size`` (the *input frame*);
:func:`input_to_cache` pastes an input-frame volume back into the lung box.

- :func:`study_volume` reads one study from the cache (uint8 (n, S, S, 3), SOPInstanceUIDs, lung box);
- :func:`pe_window` turns the cache's G channel (PE window, centre 100 HU, width 700 HU) into the
  paper's student window (centre 100 HU, width 400 HU) in [0, 1]: the G channel spans -250..450 HU,
  so the narrower window loses nothing but its 8-bit steps;
- :func:`truth_labels` rasterises box truth (``SOPInstanceUID,x,y,width,height`` in original DICOM
  pixels: the phantom's ``train_boxes.csv`` / ``phantom_test_boxes.csv``) into 3D emboli.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pe import paths
from pe.data.cache import load_boxes, load_study_images
from pe.data.slices import clip_box
from pe.data.windows import WINDOWS
from pe.localize.clusters import boxes_to_labels
from pe.rspect import SOP, STUDY

_UID_RE = re.compile(r"^[A-Za-z0-9._-]+$")
STUDENT_WINDOW = (100.0, 400.0)  # condrea2024: centre 100 HU, width 400 HU


def check_uid(uid: str, what: str = "StudyInstanceUID") -> str:
    """``uid`` when it is safe as a file name (ids come from DICOM headers and CSVs), else ValueError."""
    if not isinstance(uid, str) or not _UID_RE.match(uid) or uid in (".", ".."):
        raise ValueError(f"{what} {uid!r} is not usable as a file name")
    return uid


@dataclass
class StudyFrames:
    """One cached study: images uint8 (n, S, S, 3) in z order, its SOPInstanceUIDs, the lung box
    (x0, y0, x1, y1) in cache pixels or None."""

    images: np.ndarray
    sops: list[str]
    box: tuple[int, int, int, int] | None


def lung_boxes(cache_dir: Path) -> dict[str, tuple[int, int, int, int]]:
    """StudyInstanceUID → lung box of ``CACHE/boxes.csv`` (empty when the file is missing)."""
    try:
        boxes = load_boxes(cache_dir)
    except FileNotFoundError:
        return {}
    return {str(r[STUDY]): (int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"])) for r in boxes.to_dict("records")}


def study_volume(cache_dir: Path, study: str, index: pd.DataFrame,
                 boxes: dict[str, tuple[int, int, int, int]]) -> StudyFrames:
    rows = index.loc[index[STUDY] == study].sort_values("slice_index")
    if rows.empty:
        raise KeyError(f"study {study} is not in the cache index of {cache_dir}")
    images = load_study_images(cache_dir, study, index)
    if len(images) != len(rows):
        raise ValueError(f"{cache_dir}: study {study} has {len(images)} images but {len(rows)} index rows")
    return StudyFrames(images=images, sops=rows[SOP].astype(str).tolist(), box=boxes.get(study))


def pe_window(images: np.ndarray, window: tuple[float, float] = STUDENT_WINDOW) -> np.ndarray:
    """float32 (n, S, S) in [0, 1]: the cache's G channel re-windowed to ``window`` (centre, width)."""
    centre, width = WINDOWS["pe"]
    hu = (centre - width / 2) + images[..., 1].astype(np.float32) * (width / 255.0)
    lo = window[0] - window[1] / 2
    return np.clip((hu - lo) / window[1], 0.0, 1.0).astype(np.float32)


def crop_region(box: Sequence[int] | None, size: int, crop_lung: bool) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the cache image the CNN input was cut from (the whole image without a
    usable lung box), with the CNN's own :func:`pe.data.slices.clip_box`."""
    b = clip_box(box, size, size) if crop_lung else None
    return b if b is not None else (0, 0, size, size)


def input_to_cache(vol: np.ndarray, region: tuple[int, int, int, int], size: int) -> np.ndarray:
    """An integer input-frame volume (n, h, w) pasted into ``region`` of an (n, size, size) zero
    volume (nearest-neighbour resize, so labels and iteration numbers stay integers)."""
    x0, y0, x1, y1 = region
    out = np.zeros((vol.shape[0], size, size), vol.dtype)
    for z in np.flatnonzero(vol.reshape(vol.shape[0], -1).any(axis=1)):
        out[z, y0:y1, x0:x1] = cv2.resize(vol[z].astype(np.uint16), (x1 - x0, y1 - y0),
                                          interpolation=cv2.INTER_NEAREST).astype(vol.dtype)
    return out


def read_truth_boxes(path: str | Path) -> pd.DataFrame:
    """The box truth CSV (``pe.data.annotations.read_boxes`` validation)."""
    from pe.data.annotations import read_boxes

    return read_boxes(path)


def truth_labels(boxes: pd.DataFrame, meta: pd.DataFrame, study: str, n_slices: int, size: int) -> np.ndarray:
    """int32 (n_slices, size, size) true emboli of ``study`` in the cache frame: boxes of its slices
    scaled from original pixels (metadata ``rows``/``columns``) to ``size``, 26-connected across
    neighbouring slices into 3D emboli."""
    m = meta.loc[meta[STUDY] == study, [SOP, "slice_index", "rows", "columns"]]
    b = boxes.merge(m, on=SOP, how="inner")
    rows = []
    for r in b.itertuples(index=False):
        sx, sy = size / float(r.columns), size / float(r.rows)
        rows.append((int(r.slice_index), r.x * sx, r.y * sy, (r.x + r.width) * sx, (r.y + r.height) * sy))
    return boxes_to_labels((n_slices, size, size), rows)


class Truth:
    """Box truth of one split, rasterised per study on demand (and kept)."""

    def __init__(self, boxes_csv: str | Path, meta: pd.DataFrame) -> None:
        self.boxes = read_truth_boxes(boxes_csv)
        self.meta = meta
        self._cache: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}

    @classmethod
    def for_split(cls, split: str, boxes_csv: str | Path) -> Truth:
        cols = [STUDY, SOP, "slice_index", "rows", "columns"]
        return cls(boxes_csv, pd.read_parquet(paths.meta_path(split), columns=cols))

    def labels(self, study: str, shape: tuple[int, ...], keep: bool = True) -> np.ndarray:
        """The study's true emboli in the cache frame ``shape``; ``keep=False`` does not cache them (one
        pass over many studies, e.g. the oracle student's training set)."""
        key = (study, tuple(shape))
        if key in self._cache:
            return self._cache[key]
        if shape[1] != shape[2]:
            raise ValueError(f"study {study}: cache-frame volumes are square, got {shape}")
        lab = truth_labels(self.boxes, self.meta, study, shape[0], shape[1])
        if keep:
            self._cache[key] = lab
        return lab
