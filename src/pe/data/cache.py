"""3-window JPEG cache of every slice, with per-study lung boxes (CONTRACTS.md, stage 02).

Layout of a cache folder ``OUT``:

- ``OUT/<StudyInstanceUID>/<slice_index:04d>.jpg``: R = lung, G = PE, B = mediastinal window
  (:mod:`pe.data.windows`), ``size``×``size``, JPEG with 4:4:4 chroma sampling;
- ``OUT/_parts/<StudyInstanceUID>.parquet``: the study's index rows, written last, so its presence
  means the study is complete (the resume rule); ``OUT/_parts/<study>.errors.csv`` its decode errors;
  ``OUT/_rois/<StudyInstanceUID>.parquet`` its ROI rows (written before the part; a complete study
  without one, e.g. cached before ROIs existed, gets only its ROI computed on the next run);
- ``OUT/index.parquet`` (StudyInstanceUID, SOPInstanceUID, slice_index, file relative to OUT,
  replaced), ``OUT/boxes.csv`` (StudyInstanceUID, x0, y0, x1, y1, size; cached-image pixels,
  x1/y1 exclusive so ``img[y0:y1, x0:x1]`` is the crop), ``OUT/rois.parquet`` (one row per slice:
  StudyInstanceUID, slice_index, x0, y0, x1, y1, size, found; the lungs ∪ heart ROI box of
  :mod:`pe.anatomy.roi`, same pixel convention) and ``OUT/errors.csv`` (file,
  StudyInstanceUID, SOPInstanceUID, reason): rebuilt from all parts at the end of every run, so
  several runs into the same OUT (train then test, or shards) accumulate.

Why 4:4:4: OpenCV's default 4:2:0 chroma subsampling averages colour over 2×2 blocks, and since
our colours are three different windows, edges bleed one window into another (RSPECT.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from pe.anatomy.lungbox import LungAccumulator
from pe.anatomy.roi import ROI_EVERY, ROI_GRID, RoiAccumulator, pixel_spacing_mm
from pe.anatomy.roi_cache import (  # noqa: F401
    ROI_PARTS,
    load_rois,
    merge_rois,
    roi_from_files,
    roi_part_path,
    write_roi_part,
)
from pe.data.dicom import read_dataset, read_pixels, rescale
from pe.data.windows import window_pixels
from pe.io import write_bytes_atomic, write_csv_atomic, write_parquet_atomic

INDEX_COLUMNS = ["StudyInstanceUID", "SOPInstanceUID", "slice_index", "file", "replaced"]
BOX_COLUMNS = ["StudyInstanceUID", "x0", "y0", "x1", "y1", "size"]
ERROR_COLUMNS = ["file", "StudyInstanceUID", "SOPInstanceUID", "reason"]
META_REQUIRED = ["StudyInstanceUID", "SOPInstanceUID", "path", "slice_index"]
PARTS = "_parts"


# --------------------------------------------------------------------------- JPEG helpers
def _jpeg_params(quality: int, sampling_444: bool = True) -> list[int]:
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    if sampling_444:
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    return params


def _encode_bgr(bgr: np.ndarray, params: list[int]) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, params)
    if not ok:
        raise RuntimeError(f"cv2.imencode failed on an image of shape {bgr.shape}")
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 95, sampling_444: bool = True) -> bytes:
    """JPEG bytes of an RGB uint8 image (4:4:4 unless ``sampling_444=False``, OpenCV's 4:2:0)."""
    return _encode_bgr(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), _jpeg_params(quality, sampling_444))


def decode_jpeg(data: bytes) -> np.ndarray:
    """RGB uint8 (H, W, 3) image of JPEG bytes written by :func:`encode_jpeg` or the cache."""
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("cv2.imdecode could not decode the JPEG bytes")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_jpeg(path: str | os.PathLike[str]) -> np.ndarray:
    """RGB uint8 (H, W, 3) image of one cached JPEG file."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"{path}: missing or not a readable JPEG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def jpeg_roundtrip(rgb: np.ndarray, quality: int = 95, sampling_444: bool = True) -> np.ndarray:
    """What the cache stores for ``rgb``: encode then decode."""
    return decode_jpeg(encode_jpeg(rgb, quality, sampling_444))


# --------------------------------------------------------------------------- one slice
def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """``size``×``size`` copy: INTER_AREA when shrinking (no aliasing), bilinear when enlarging."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    interp = cv2.INTER_AREA if size < max(h, w) else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def slice_to_rgb(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """The model input of one DICOM slice before JPEG: ``resize_image(window_rgb(read_hu(path)), size)``.

    The Kaggle kernel calls this on test DICOMs, so its inputs match what training read from the
    cache (up to the JPEG round trip, :func:`jpeg_roundtrip`).
    """
    ds = read_dataset(path)
    # window_pixels on the stored values is bit-identical to window_rgb(read_hu(path)) (tested), faster.
    return resize_image(window_pixels(read_pixels(ds, path), *rescale(ds)), size)


# --------------------------------------------------------------------------- one study
@dataclass
class _StudyJob:
    study: str
    paths: list[str]
    sops: list[str]
    slice_indices: list[int]
    out: str
    size: int
    quality: int
    roi: bool = True  # compute the study's ROI boxes (pe.anatomy.roi)
    images: bool = True  # False: the JPEGs and part exist, only the ROI part is missing
    roi_grid: int = ROI_GRID
    roi_every: int = ROI_EVERY


def jpeg_name(slice_index: int) -> str:
    return f"{int(slice_index):04d}.jpg"


def part_path(out: Path, study: str) -> Path:
    return out / PARTS / f"{study}.parquet"


def _roi_acc(job: _StudyJob, ds: Any, shape: tuple[int, int]) -> RoiAccumulator:
    return RoiAccumulator(len(job.paths), *shape, pixel_spacing_mm(ds), grid=job.roi_grid, every=job.roi_every)


def _write_roi(job: _StudyJob, roi: RoiAccumulator | None) -> None:
    """The study's ROI part; without one (--no-roi, nothing decoded) a stale part of an earlier run goes."""
    if roi is not None:
        write_roi_part(Path(job.out), job.study, job.slice_indices, job.size, roi)
    else:
        roi_part_path(Path(job.out), job.study).unlink(missing_ok=True)


def _roi_only(job: _StudyJob) -> dict[str, Any]:
    """ROI part of a study whose images are already cached: reads only the masked slices' pixels."""
    cpu0 = time.process_time()
    _write_roi(job, roi_from_files(job.paths, lambda ds, shape: _roi_acc(job, ds, shape)))
    return {"study": job.study, "status": "roi", "n": 0, "replaced": 0, "errors": 0,
            "cpu": time.process_time() - cpu0}


def _errors_path(out: Path, study: str) -> Path:
    return out / PARTS / f"{study}.errors.csv"


class _Worker:
    """Per-process state: buffers reused across slices of the same shape, JPEG parameters."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, int], np.ndarray] = {}

    def buffer(self, shape: tuple[int, int]) -> np.ndarray:
        buf = self.buffers.get(shape)
        if buf is None:
            buf = self.buffers[shape] = np.empty((*shape, 3), dtype=np.uint8)
        return buf

    def run(self, job: _StudyJob) -> dict[str, Any]:
        if not job.images:
            return _roi_only(job)
        cpu0 = time.process_time()
        out = Path(job.out)
        study_dir = out / job.study
        study_dir.mkdir(parents=True, exist_ok=True)
        params = _jpeg_params(job.quality)
        n = len(job.paths)
        ok = np.zeros(n, dtype=bool)
        errors: list[dict[str, str]] = []
        acc: LungAccumulator | None = None
        roi: RoiAccumulator | None = None
        for k, (path, si) in enumerate(zip(job.paths, job.slice_indices, strict=True)):
            try:
                ds = read_dataset(path)
                slope, intercept = rescale(ds)
                pixels = read_pixels(ds, path)
                # Table lookup on the stored values: bit-identical to window_rgb(read_hu(path)).
                bgr = window_pixels(pixels, slope, intercept, out=self.buffer(pixels.shape), bgr=True)
            except Exception as e:  # any unreadable input: log, replace below, never crash the run
                errors.append({"file": str(path), "StudyInstanceUID": job.study,
                               "SOPInstanceUID": job.sops[k], "reason": f"{type(e).__name__}: {e}"})
                continue
            # Outside the try: a failing disk is not a corrupt slice and must stop the run.
            write_bytes_atomic(study_dir / jpeg_name(si), _encode_bgr(resize_image(bgr, job.size), params))
            if acc is None:
                acc = LungAccumulator(*pixels.shape)
            acc.add_pixels(pixels, slope, intercept)  # == acc.add(read_hu(path)), as the kernel does
            if job.roi:
                roi = roi or _roi_acc(job, ds, pixels.shape)
                roi.add_pixels(k, pixels, slope, intercept)
            ok[k] = True
        err_path = _errors_path(out, job.study)
        if errors:
            write_csv_atomic(pd.DataFrame(errors, columns=ERROR_COLUMNS), err_path)
        elif err_path.exists():
            err_path.unlink()  # stale errors of an earlier (--force) run of this study
        if not ok.any():
            with contextlib.suppress(OSError):
                study_dir.rmdir()  # empty
            return {"study": job.study, "status": "failed", "n": n, "replaced": 0, "errors": len(errors),
                    "cpu": time.process_time() - cpu0}
        replaced = _replace_bad_slices(study_dir, job.slice_indices, ok)
        assert acc is not None
        x0, y0, x1, y1 = acc.box(job.size)
        part = pd.DataFrame({
            "StudyInstanceUID": job.study,
            "SOPInstanceUID": job.sops,
            "slice_index": np.asarray(job.slice_indices, dtype=np.int32),
            "file": [f"{job.study}/{jpeg_name(si)}" for si in job.slice_indices],
            "replaced": ~ok,
        })
        for name, v in zip(("box_x0", "box_y0", "box_x1", "box_y1"), (x0, y0, x1, y1), strict=True):
            part[name] = np.int32(v)
        part["box_size"] = np.int32(job.size)
        _write_roi(job, roi)
        write_parquet_atomic(part, part_path(out, job.study))  # last: marks the study complete
        return {"study": job.study, "status": "done", "n": n, "replaced": replaced, "errors": len(errors),
                "cpu": time.process_time() - cpu0}


def _replace_bad_slices(study_dir: Path, slice_indices: list[int], ok: np.ndarray) -> int:
    """Copy the nearest decodable slice (the earlier one on ties) over each undecodable one."""
    good = np.flatnonzero(ok)
    bad = np.flatnonzero(~ok)
    for k in bad:
        nearest = good[np.argmin(np.abs(good - k))]  # argmin keeps the first (earlier) on ties
        data = (study_dir / jpeg_name(slice_indices[nearest])).read_bytes()
        write_bytes_atomic(study_dir / jpeg_name(slice_indices[k]), data)
    return len(bad)


_WORKER: _Worker | None = None


def _init_worker() -> None:
    """Pool initializer: single-threaded OpenCV (one study per process already fills the cores)
    and the numba kernels loaded now rather than inside the first study."""
    global _WORKER
    _die_with_parent()
    cv2.setNumThreads(1)
    window_pixels(np.zeros((2, 2), np.int16), 1.0, -1024.0)
    _WORKER = _Worker()


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent (the forkserver, which exits with the main process) dies,
    so a killed run leaves no orphan worker writing into the cache while it is re-run."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_ready(_: int) -> None:
    time.sleep(0.02)  # long enough that every worker takes one: all have finished their start-up


def _run_job(job: _StudyJob) -> dict[str, Any]:
    global _WORKER
    if _WORKER is None:  # in-process run (workers=1): leave the caller's OpenCV settings alone
        _WORKER = _Worker()
    return _WORKER.run(job)


def _pool(workers: int) -> Any:
    """A process pool that is safe whatever the caller did before: ``forkserver`` workers start from
    a clean process that imported only pe.data.cache. Plain ``fork`` deadlocks when the parent already ran
    OpenCV's thread pool (cv2.setNumThreads in the child waits on the parent's condition variables:
    seen with gdb), and ``spawn`` would re-import everything in every worker."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pe.data.cache"])
    return ctx.Pool(workers, initializer=_init_worker)


# --------------------------------------------------------------------------- the whole cache
def _read_meta(meta: Path | str | pd.DataFrame) -> pd.DataFrame:
    if isinstance(meta, pd.DataFrame):
        df, name = meta, "<DataFrame>"
    else:
        name = str(meta)
        if not Path(meta).exists():
            raise FileNotFoundError(f"{meta}: metadata parquet not found (src/01_parse_metadata.py writes it)")
        import pyarrow.parquet as pq

        names = pq.read_schema(meta).names
        # only the columns needed (the train table carries ~30 more)
        df = pd.read_parquet(meta, columns=[c for c in META_REQUIRED if c in names])
    missing = [c for c in META_REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: metadata lacks columns {missing} (CONTRACTS.md, stage 01)")
    df = df[META_REQUIRED].copy()
    df["slice_index"] = df["slice_index"].astype(int)
    dup = df.duplicated(["StudyInstanceUID", "slice_index"])
    if dup.any():
        raise ValueError(f"{name}: duplicated (StudyInstanceUID, slice_index), e.g. {df[dup].iloc[0].to_dict()}")
    return df.sort_values(["StudyInstanceUID", "slice_index"], kind="stable")


def in_shard(study: str, shard: tuple[int, int] | None) -> bool:
    """Stable assignment of a study to shard i of n (md5 of the UID, independent of the meta's rows)."""
    if shard is None:
        return True
    i, n = shard
    return int(hashlib.md5(study.encode()).hexdigest(), 16) % n == i


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 ≤ i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError as e:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from e
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def merge_parts(out: Path) -> dict[str, int]:
    """Rebuild OUT/index.parquet, boxes.csv, rois.parquet and errors.csv from every part in OUT/_parts
    and OUT/_rois."""
    parts_dir = out / PARTS
    parts = sorted(parts_dir.glob("*.parquet")) if parts_dir.exists() else []
    frames = [pd.read_parquet(p) for p in parts]
    if frames:
        full = pd.concat(frames, ignore_index=True)
    else:
        full = pd.DataFrame(columns=INDEX_COLUMNS + ["box_x0", "box_y0", "box_x1", "box_y1", "box_size"])
    full = full.sort_values(["StudyInstanceUID", "slice_index"], kind="stable").reset_index(drop=True)
    index = full[INDEX_COLUMNS].astype({"slice_index": np.int32, "replaced": bool})
    write_parquet_atomic(index, out / "index.parquet")
    boxes = full.drop_duplicates("StudyInstanceUID")[
        ["StudyInstanceUID", "box_x0", "box_y0", "box_x1", "box_y1", "box_size"]]
    boxes.columns = BOX_COLUMNS
    write_csv_atomic(boxes, out / "boxes.csv")
    merge_rois(out, set(boxes["StudyInstanceUID"]))
    err_files = sorted(parts_dir.glob("*.errors.csv")) if parts_dir.exists() else []
    errors = pd.concat([pd.read_csv(p, dtype=str) for p in err_files], ignore_index=True) if err_files \
        else pd.DataFrame(columns=ERROR_COLUMNS)
    write_csv_atomic(errors[ERROR_COLUMNS], out / "errors.csv")
    return {"index_rows": len(index), "index_studies": len(boxes), "error_rows": len(errors)}


def _plan_jobs(df: pd.DataFrame, out: Path, size: int, quality: int, shard: tuple[int, int] | None,
               force: bool, roi: tuple[bool, int, int] = (True, ROI_GRID, ROI_EVERY)
               ) -> tuple[list[_StudyJob], int, int]:
    """(jobs of the studies still to cache, studies in the shard, studies already complete).
    ``roi`` = (on, grid, every); a complete study lacking only its ROI part gets a ROI-only job."""
    jobs: list[_StudyJob] = []
    n_selected = n_complete = 0
    for study, g in df.groupby("StudyInstanceUID", sort=True):
        study = str(study)
        if not in_shard(study, shard):
            continue
        n_selected += 1
        images = force or not part_path(out, study).exists()
        if not images and (not roi[0] or roi_part_path(out, study).exists()):
            n_complete += 1
            continue
        jobs.append(_StudyJob(study, g["path"].astype(str).tolist(), g["SOPInstanceUID"].astype(str).tolist(),
                              g["slice_index"].tolist(), str(out), int(size), int(quality), roi[0], images,
                              int(roi[1]), int(roi[2])))
    return jobs, n_selected, n_complete


def cache_images(meta: Path | str | pd.DataFrame, out: Path | str, size: int = 512, quality: int = 95,
                 workers: int = 1, shard: tuple[int, int] | None = None, force: bool = False,
                 progress: bool = True, roi: bool = True, roi_grid: int = ROI_GRID, roi_every: int = ROI_EVERY
                 ) -> dict[str, Any]:
    """Write the JPEG cache of every slice in ``meta`` (metadata parquet or table) into ``out``.

    Resumable: studies whose part file exists are skipped unless ``force``. ``shard=(i, n)``
    processes only the studies of shard i. ``roi`` also writes the per-slice ROI boxes
    (:mod:`pe.anatomy.roi`; ``roi_grid``/``roi_every`` only for benchmarks: the kernel uses the
    defaults). Returns (and prints) summary counts; ``seconds`` and
    ``images_per_s`` are the steady state (pool start-up excluded), ``seconds_with_startup`` all of it.

    ``workers > 1`` starts a ``forkserver`` pool, so a script calling this needs the usual
    ``if __name__ == "__main__":`` guard (its workers import the main module, as with ``spawn``).
    """
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    out = Path(out)
    df = _read_meta(meta)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    (out / ROI_PARTS).mkdir(exist_ok=True)
    jobs, n_selected, n_complete = _plan_jobs(df, out, size, quality, shard, force, (roi, roi_grid, roi_every))
    # Largest studies first keeps every worker busy to the end.
    jobs.sort(key=lambda j: -len(j.paths))
    n_images = sum(len(j.paths) for j in jobs if j.images)
    counts = {"done": 0, "failed": 0, "roi": 0, "slices": 0, "replaced": 0, "errors": 0, "cpu": 0.0}
    failed: list[str] = []
    t_start = t0 = time.perf_counter()
    bar = tqdm(total=n_images, unit="img", desc=f"cache {out.name}", disable=not progress)
    workers = max(1, min(int(workers), len(jobs))) if jobs else 1

    def _collect(res: dict[str, Any]) -> None:
        counts[res["status"]] += 1
        counts["cpu"] += res["cpu"]  # worker CPU seconds: the cost per image whatever the machine's load
        counts["errors"] += res["errors"]
        counts["replaced"] += res["replaced"]
        if res["status"] == "done":
            counts["slices"] += res["n"]
        elif res["status"] == "failed":
            failed.append(res["study"])
        bar.update(res["n"])

    try:
        if workers == 1:
            for job in jobs:
                _collect(_run_job(job))
        else:
            with _pool(workers) as pool:
                pool.map(_worker_ready, range(2 * workers), chunksize=1)
                t0 = time.perf_counter()  # steady state from here: start-up and imports excluded
                for res in pool.imap_unordered(_run_job, jobs, chunksize=1):
                    _collect(res)
    finally:
        bar.close()
    t_end = time.perf_counter()
    seconds = t_end - t0
    merged = merge_parts(out)
    summary = {
        "studies_selected": n_selected, "studies_already_complete": n_complete,
        "studies_done": counts["done"], "studies_failed": counts["failed"], "failed_studies": failed,
        "studies_roi_only": counts["roi"],
        "slices_written": counts["slices"], "slices_replaced": counts["replaced"],
        "slice_errors": counts["errors"], "seconds": round(seconds, 3),
        "seconds_with_startup": round(t_end - t_start, 3), "worker_cpu_seconds": round(counts["cpu"], 3),
        "images_per_s": round(n_images / seconds, 1) if seconds > 0 and n_images else 0.0,
        **merged,
    }
    print(
        f"cache {out}: {n_selected} studies selected, {n_complete} already complete, "
        f"{counts['done']} done, {counts['failed']} failed (no decodable slice{': ' + ', '.join(failed[:5]) if failed else ''}); "
        f"{counts['slices']} slices written, {counts['replaced']} replaced by a neighbour, "
        f"{counts['errors']} decode errors; {summary['images_per_s']} img/s; "
        f"index: {merged['index_rows']} rows / {merged['index_studies']} studies"
    )
    return summary


# --------------------------------------------------------------------------- readers
def load_index(cache_dir: Path | str) -> pd.DataFrame:
    """OUT/index.parquet (StudyInstanceUID, SOPInstanceUID, slice_index, file, replaced)."""
    p = Path(cache_dir) / "index.parquet"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no cache index (run src/02_cache_images.py)")
    return pd.read_parquet(p)


def load_boxes(cache_dir: Path | str) -> pd.DataFrame:
    """OUT/boxes.csv (StudyInstanceUID, x0, y0, x1, y1, size); crop with ``img[y0:y1, x0:x1]``."""
    p = Path(cache_dir) / "boxes.csv"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no lung boxes (run src/02_cache_images.py)")
    return pd.read_csv(p, dtype={"StudyInstanceUID": str})


def load_study_images(cache_dir: Path | str, study_uid: str, index: pd.DataFrame | None = None) -> np.ndarray:
    """uint8 (n_slices, S, S, 3) RGB images of one study in z order (slice_index ascending)."""
    cache_dir = Path(cache_dir)
    if index is None:
        p = part_path(cache_dir, study_uid)  # the study's own small part: no need to read the full index
        if not p.exists():
            raise FileNotFoundError(f"{p}: study {study_uid} is not (completely) cached in {cache_dir}")
        rows = pd.read_parquet(p, columns=["slice_index", "file"])
    else:
        rows = index.loc[index["StudyInstanceUID"] == study_uid, ["slice_index", "file"]]
        if rows.empty:
            raise KeyError(f"study {study_uid} not in the cache index of {cache_dir}")
    rows = rows.sort_values("slice_index")
    return np.stack([read_jpeg(cache_dir / f) for f in rows["file"]])
