"""The kernel's input side (split out of :mod:`pe.infer.kernel`): the split's header table, DICOM
decoding of whole studies in worker processes, and the list of images whose prediction is a
fallback (for the kernel's summary JSON).

Fallback reasons, one per listed image (an image is listed once, the first reason that applies):

| reason             | what the image's prediction is                                         |
|--------------------|------------------------------------------------------------------------|
| no_file            | its test.csv row has no usable DICOM: the study's mean image prediction |
| study_failed       | no slice of its study could be decoded: the training prior              |
| undecodable        | its pixels could not be read: predicted from its nearest decodable slice |
| position_fallback  | no usable ImagePositionPatient: predicted from its own pixels, placed at the z that pe.data.metadata estimated |
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pe.rspect import SOP, STUDY


@dataclasses.dataclass
class StudyImages:
    """One decoded study: the CNN's input stack in z order, its lung box, its per-slice ROI rows
    (boxes, found, size: :class:`pe.anatomy.roi.RoiAccumulator` as stage 02 computes them; None unless
    asked for) and what failed."""

    study: str
    sops: list[str]
    images: np.ndarray | None  # (n, S, S, 3) uint8 in z order, None when nothing decoded
    box: tuple[int, int, int, int] | None
    errors: list[str]
    seconds: float
    failed: list[int] = dataclasses.field(default_factory=list)  # slice positions that did not decode
    rois: tuple[np.ndarray, np.ndarray, int] | None = None


def load_study(study: str, sops: Sequence[str], dicom_paths: Sequence[str], size: int,
               jpeg_quality: int | None, roi: bool = False) -> StudyImages:
    """Decode one study (paths in z order) into the CNN's input stack and its lung box (and, with
    ``roi``, its per-slice ROI boxes in the pixels of the ``size`` images, as stage 02 stores them).

    Per slice this is :func:`pe.data.cache.slice_to_rgb` (read_hu → window_rgb → resize_image), spelled
    out because the HU are also needed for the lung box; ``jpeg_quality`` None skips the JPEG round
    trip. Undecodable slices are logged and replaced by the nearest decodable one (the earlier on
    ties), exactly as the cache does.
    """
    from pe.anatomy.lungbox import LungAccumulator
    from pe.anatomy.roi import RoiAccumulator, pixel_spacing_mm
    from pe.data.cache import jpeg_roundtrip, resize_image
    from pe.data.dicom import read_dataset, read_hu
    from pe.data.windows import window_rgb

    t0 = time.perf_counter()
    n = len(dicom_paths)
    ok = np.zeros(n, dtype=bool)
    images: np.ndarray | None = None
    acc: LungAccumulator | None = None
    racc: RoiAccumulator | None = None
    errors: list[str] = []
    for k, path in enumerate(dicom_paths):
        try:
            hu = read_hu(path)
            rgb = resize_image(window_rgb(hu), size)
            if jpeg_quality is not None:
                rgb = jpeg_roundtrip(rgb, jpeg_quality)
            if images is None:
                images = np.zeros((n, size, size, 3), dtype=np.uint8)
            images[k] = rgb
            if acc is None:
                acc = LungAccumulator(*hu.shape)
            acc.add(hu)
            if roi:
                racc = racc or RoiAccumulator(n, *hu.shape, pixel_spacing_mm(read_dataset(path)))
                racc.add(k, hu)
            ok[k] = True
        except Exception as e:  # a broken file must not stop a 9-hour run: log and replace
            errors.append(f"{path}: {type(e).__name__}: {e}")
    failed = [int(k) for k in np.flatnonzero(~ok)]
    if images is None or acc is None:
        return StudyImages(study, list(sops), None, None, errors, time.perf_counter() - t0, failed)
    good = np.flatnonzero(ok)
    for k in failed:
        images[k] = images[good[np.argmin(np.abs(good - k))]]
    rois = None if racc is None else (*racc.boxes(size), size)
    return StudyImages(study, list(sops), images, acc.box(size), errors, time.perf_counter() - t0, failed, rois)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one study per process already uses the cores
    # (no torch call here: the pool is forked after the models were built, and torch's OpenMP pool
    # is not fork-safe; the workers only decode, window and encode.)


def _load_study_job(args: tuple[Any, ...]) -> StudyImages:
    return load_study(*args)


def iter_studies(jobs: Sequence[tuple[Any, ...]], workers: int, prefetch: int) -> Iterator[StudyImages]:
    """Decoded studies in ``jobs`` order; with ``workers`` > 0 a process pool decodes up to
    ``prefetch`` studies ahead of the consumer (bounded, so memory stays at a few studies)."""
    if workers <= 0:
        for job in jobs:
            yield _load_study_job(job)
        return
    # forkserver, not fork: a fork of a process whose OpenCV / OpenMP / torch thread pools have run
    # inherits their locks, and the child hangs in _init_worker's cv2.setNumThreads (seen when the
    # kernel path ran after a training step in the same process).
    ctx = mp.get_context("forkserver") if "forkserver" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        pending: deque[Any] = deque()
        it = iter(jobs)
        for job in it:
            pending.append(pool.apply_async(_load_study_job, (job,)))
            if len(pending) >= prefetch:
                break
        while pending:
            result = pending.popleft().get()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.apply_async(_load_study_job, (nxt,)))
            yield result


def read_study_table(data_dir: Path, split: str, work_dir: Path, workers: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Headers of every DICOM of the split (:func:`pe.data.metadata.parse_metadata`: study, SOP, path,
    slice_index, sorted by study then z) and the parse's problems table (file, study, problem, detail)."""
    from pe.data.metadata import parse_metadata, problems_path

    out = work_dir / f"{split}_meta.parquet"
    if not out.is_file():
        parse_metadata(data_dir, split, out, workers=max(1, workers))
    meta = pd.read_parquet(out, columns=[STUDY, SOP, "path", "slice_index"])
    # object, not pandas' arrow strings: isin/groupby on those fall back to slow Python loops
    meta[STUDY] = meta[STUDY].astype(str).astype(object)
    meta[SOP] = meta[SOP].astype(str).astype(object)
    problems = pd.read_csv(problems_path(out), dtype=str, keep_default_na=False)
    return meta.sort_values([STUDY, "slice_index"], kind="stable").reset_index(drop=True), problems


def fallback_images(ids_df: pd.DataFrame, meta: pd.DataFrame, problems: pd.DataFrame,
                    failed_studies: Sequence[str], undecodable: dict[str, str]) -> list[dict[str, str]]:
    """Every image of ``ids_df`` whose prediction is a fallback, with its reason (module docstring).

    ``undecodable``: SOPInstanceUID → the decode error of that slice."""
    out: list[dict[str, str]] = []
    seen: set[str] = set()

    def add(sop: str, study: str, reason: str, detail: str) -> None:
        if sop not in seen:
            seen.add(sop)
            out.append({SOP: sop, STUDY: study, "reason": reason, "detail": detail})

    on_disk = set(meta[SOP])
    failed = set(failed_studies)
    for sop, study in zip(ids_df[SOP], ids_df[STUDY], strict=True):
        if sop not in on_disk:
            add(sop, study, "no_file", "no usable DICOM (see problems): the study's mean image prediction")
        elif study in failed:
            add(sop, study, "study_failed", "no slice of the study decoded: the training prior")
    for sop, err in undecodable.items():
        study = meta.loc[meta[SOP] == sop, STUDY].iloc[0]
        add(sop, study, "undecodable", f"predicted from the nearest decodable slice; {err}"[:300])
    moved = problems[problems["problem"] == "position_fallback"]
    by_path = meta.set_index("path")
    for path, detail in zip(moved["file"], moved["detail"], strict=True):
        if path in by_path.index:
            add(str(by_path.at[path, SOP]), str(by_path.at[path, STUDY]), "position_fallback",
                f"predicted from its own pixels; {detail}")
    return out
