"""A small synthetic JPEG cache (stage 02's layout) with planted positive blobs, for tests of the
CNN data path and trainer that do not need the phantom's DICOMs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pe.data.cache import encode_jpeg
from pe.rspect import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY


def write_synthetic_cache(out: str | Path, n_studies: int = 10, min_slices: int = 12, max_slices: int = 24,
                          size: int = 128, seed: int = 0, pos_frac: float = 0.5, n_folds: int = 5) -> dict[str, Path]:
    """A tiny stand-in for stages 01–03 outputs, for tests and benchmarks of this stage.

    Writes ``out/cache`` (JPEG slices, index.parquet, boxes.csv in the stage-02 format),
    ``out/meta.parquet`` (ids, slice_index and train.csv labels, label-consistent) and
    ``out/folds.csv`` (study i in fold i mod n_folds). Body = a grey ellipse with two dark "lungs";
    each positive study has a run of positive slices showing a bright disc inside a lung, drifting
    slowly in z like a clot; noise everywhere so JPEG sizes are realistic.
    """

    out = Path(out)
    cache = out / "cache"
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = ((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.35) ** 2 < 1
    lungs = [((xx - cx) / 0.15) ** 2 + ((yy - 0.47) / 0.22) ** 2 < 1 for cx in (0.3, 0.7)]
    base = np.where(body, 110, 10).astype(np.float32)
    for lung in lungs:
        base[lung] = 40
    index_rows, meta_rows, box_rows = [], [], []
    for s in range(n_studies):
        study = f"{rng.integers(16**12):012x}"
        series = f"{rng.integers(16**12):012x}"
        n = int(rng.integers(min_slices, max_slices + 1))
        positive = s % 2 == 0 if pos_frac == 0.5 else rng.random() < pos_frac
        pos_lo = int(rng.integers(0, max(n // 2, 1)))
        pos_hi = min(n, pos_lo + max(3, n // 3)) if positive else -1
        side = int(rng.integers(0, 2))
        cx0, cy0 = (0.3 if side == 0 else 0.7) + rng.uniform(-0.05, 0.05), 0.47 + rng.uniform(-0.1, 0.1)
        exam = dict.fromkeys(EXAM_LABELS, 0)
        if positive:
            rv = int(rng.integers(0, 2))
            exam.update(rv_lv_ratio_gte_1=rv, rv_lv_ratio_lt_1=1 - rv, central_pe=int(rng.integers(0, 2)),
                        leftsided_pe=int(side == 1), rightsided_pe=int(side == 0))
        else:
            exam["indeterminate" if rng.random() < 0.1 else "negative_exam_for_pe"] = 1
        (cache / study).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            img = base + rng.normal(0, 6, base.shape).astype(np.float32) + 8 * np.sin(k / 3.0)
            pos = pos_lo <= k < pos_hi
            if pos:
                cx, cy = cx0 + 0.01 * (k - pos_lo), cy0
                img[((xx - cx) ** 2 + (yy - cy) ** 2) < 0.045**2] = 230
            rgb = np.stack([img, img * 0.8 + 20, img * 0.6 + 40], axis=-1).clip(0, 255).astype(np.uint8)
            sop = f"{rng.integers(16**12):012x}"
            rel = f"{study}/{k:04d}.jpg"
            (cache / rel).write_bytes(encode_jpeg(rgb))
            index_rows.append({STUDY: study, SOP: sop, "slice_index": k, "file": rel, "replaced": False})
            meta_rows.append({STUDY: study, "SeriesInstanceUID": series, SOP: sop, "slice_index": k,
                              "n_slices": n, IMAGE_LABEL: int(pos), **exam})
        box_rows.append({STUDY: study, "x0": int(0.12 * size), "y0": int(0.22 * size),
                         "x1": int(0.88 * size), "y1": int(0.72 * size), "size": size})
    pd.DataFrame(index_rows).to_parquet(cache / "index.parquet", index=False)
    pd.DataFrame(box_rows).to_csv(cache / "boxes.csv", index=False)
    meta = pd.DataFrame(meta_rows)
    meta.to_parquet(out / "meta.parquet", index=False)
    studies = meta[STUDY].drop_duplicates().to_numpy()
    pd.DataFrame({STUDY: studies, "fold": np.arange(len(studies)) % n_folds}).to_csv(out / "folds.csv", index=False)
    return {"cache": cache, "meta": out / "meta.parquet", "folds": out / "folds.csv"}
