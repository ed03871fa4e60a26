"""The ROI side of the stage-02 cache (:mod:`pe.data.cache`): per-study parts, their merge into
``OUT/rois.parquet`` and its reader (CONTRACTS.md, row 02).

``OUT/_rois/<StudyInstanceUID>.parquet`` holds one study's rows (:data:`pe.anatomy.roi.ROI_COLUMNS`);
it is written before the study's index part, so a complete study has its ROI unless it was cached
before ROIs existed (or with ``--no-roi``): then the next run computes only the ROI, from the masked
slices' pixels, without touching the JPEGs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pe.anatomy.roi import ROI_COLUMNS, RoiAccumulator
from pe.data.dicom import read_dataset, read_pixels, rescale
from pe.io import write_parquet_atomic

ROI_PARTS = "_rois"


def roi_part_path(out: Path, study: str) -> Path:
    return Path(out) / ROI_PARTS / f"{study}.parquet"


def roi_frame(study: str, slice_indices: Sequence[int], size: int, roi: RoiAccumulator) -> pd.DataFrame:
    """One study's ROI rows in :data:`ROI_COLUMNS` order (``slice_indices`` in z order)."""
    boxes, found = roi.boxes(size)
    frame = pd.DataFrame({"StudyInstanceUID": study, "slice_index": np.asarray(slice_indices, np.int32)})
    for j, c in enumerate(("x0", "y0", "x1", "y1")):
        frame[c] = boxes[:, j].astype(np.int32)
    frame["size"] = np.int32(size)
    frame["found"] = found
    return frame[ROI_COLUMNS]


def write_roi_part(out: Path, study: str, slice_indices: Sequence[int], size: int, roi: RoiAccumulator) -> None:
    write_parquet_atomic(roi_frame(study, slice_indices, size, roi), roi_part_path(out, study))


def roi_from_files(paths: Sequence[str], make: Callable[[Any, tuple[int, int]], RoiAccumulator]
                   ) -> RoiAccumulator | None:
    """A filled accumulator from a study's DICOMs (z order), reading only the masked slices (and
    those before the first decodable one); ``make(ds, shape)`` builds it. None when nothing decodes
    (the run that cached the images logged why)."""
    roi: RoiAccumulator | None = None
    for k, path in enumerate(paths):
        if roi is not None and not roi.wants(k):
            continue
        try:
            ds = read_dataset(path)
            slope, intercept = rescale(ds)
            pixels = read_pixels(ds, path)
        except Exception:  # an undecodable slice is interpolated over, as in the cache run
            continue
        if roi is None:
            roi = make(ds, pixels.shape)
        roi.add_pixels(k, pixels, slope, intercept)
    return roi


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(ROI_COLUMNS, [object] + ["int32"] * 6 + [bool],
                                                              strict=True)})


def merge_rois(out: Path, studies: set[str]) -> int:
    """Rebuild OUT/rois.parquet from OUT/_rois (only ``studies``: those in the index); returns rows."""
    parts_dir = Path(out) / ROI_PARTS
    files = sorted(parts_dir.glob("*.parquet")) if parts_dir.exists() else []
    rois = pd.concat([pd.read_parquet(p) for p in files], ignore_index=True) if files else _empty()
    rois = rois[rois["StudyInstanceUID"].isin(studies)]
    rois = rois.sort_values(["StudyInstanceUID", "slice_index"], kind="stable").reset_index(drop=True)
    write_parquet_atomic(rois[ROI_COLUMNS], Path(out) / "rois.parquet")
    return len(rois)


def load_rois(cache_dir: Path | str) -> pd.DataFrame:
    """OUT/rois.parquet (StudyInstanceUID, slice_index, x0, y0, x1, y1, size, found); crop slice
    ``slice_index`` with ``img[y0:y1, x0:x1]`` (pixels of the ``size``-pixel cached image)."""
    p = Path(cache_dir) / "rois.parquet"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no ROI boxes (run src/02_cache_images.py without --no-roi: it adds "
                                "the ROIs to an existing cache without redoing its images)")
    df = pd.read_parquet(p)
    missing = [c for c in ROI_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{p}: missing column(s) {missing} (CONTRACTS.md, stage 02)")
    return df


def rois_per_file(cache_dir: Path | str, studies: np.ndarray, study_len: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes (n_files, 4) float32, found bool, size float32) of ``studies``' slices 0..n-1 in order
    (a :class:`pe.data.slices.SliceTable`'s files), from ``cache_dir/rois.parquet``; every slice must
    have its row (ValueError naming the file otherwise)."""
    path = Path(cache_dir) / "rois.parquet"
    r = load_rois(cache_dir).drop_duplicates(["StudyInstanceUID", "slice_index"])
    keys = pd.MultiIndex.from_arrays([np.repeat(np.asarray(studies, dtype=object), study_len),
                                      np.concatenate([np.arange(int(n)) for n in study_len] or [np.zeros(0, int)])])
    r = r.set_index(["StudyInstanceUID", "slice_index"]).reindex(keys)
    miss = r["x0"].isna().to_numpy()
    if miss.any():
        raise ValueError(f"{path}: no ROI row for {int(miss.sum())} cached slice(s), e.g. study "
                         f"{keys[int(np.argmax(miss))][0]} (re-run src/02_cache_images.py to add them)")
    return (r[["x0", "y0", "x1", "y1"]].to_numpy(np.float32), r["found"].to_numpy(bool),
            r["size"].to_numpy(np.float32))
