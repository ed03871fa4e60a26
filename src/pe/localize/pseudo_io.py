"""Pseudo-masks on disk: compact, keyed by id, crash-safe and resumable per study.

Layout under a root folder:
- ``parts/<StudyInstanceUID>.parquet``: one row per *non-empty* slice with columns
  ``StudyInstanceUID``, ``slice_index`` (z order of the volume), ``SOPInstanceUID`` (null when not
  given) and the slice's run-length code over the row-major (y, x) flattening — ``starts``,
  ``lengths``, ``values`` (int lists; a run is a maximal stretch of one nonzero label value, so
  cluster ids survive the round trip). The volume shape (n_slices, height, width) is stored in the
  parquet schema metadata, so an all-empty study is a valid zero-row part.
- ``index.parquet``: one row per finished study (shape, voxel and cluster counts, part file), built
  from the parts' metadata by :meth:`PseudoMaskStore.write_index`.

Each part is written atomically (``pe.io.atomic_path``); a study counts as done once its part exists,
so an interrupted run resumes with :meth:`PseudoMaskStore.pending`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pe.io import atomic_path, write_parquet_atomic

META_KEY = b"pe_pseudo_mask"
_UID_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def encode_rle(labels2d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, lengths, values) int64 runs of the nonzero labels of a 2D slice (row-major)."""
    flat = np.asarray(labels2d).ravel()
    change = np.flatnonzero(np.diff(flat)) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [flat.size]]))
    values = flat[starts]
    keep = values != 0
    return starts[keep].astype(np.int64), lengths[keep].astype(np.int64), values[keep].astype(np.int64)


def decode_rle(starts: Sequence[int], lengths: Sequence[int], values: Sequence[int],
               shape: tuple[int, int]) -> np.ndarray:
    """int32 (height, width) slice from its runs."""
    flat = np.zeros(int(shape[0]) * int(shape[1]), np.int32)
    for s, n, v in zip(starts, lengths, values, strict=True):
        flat[int(s):int(s) + int(n)] = v
    return flat.reshape(shape)


def volume_to_frame(study_uid: str, labels: np.ndarray, sop_uids: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows for the non-empty slices of an int label volume (z, y, x)."""
    if labels.ndim != 3:
        raise ValueError(f"pseudo-mask of {study_uid} must be (z, y, x), got shape {labels.shape}")
    if sop_uids is not None and len(sop_uids) != labels.shape[0]:
        raise ValueError(f"{study_uid}: {len(sop_uids)} SOPInstanceUIDs for {labels.shape[0]} slices")
    rows = []
    for z in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1)):
        s, n, v = encode_rle(labels[z])
        rows.append({"StudyInstanceUID": study_uid, "slice_index": int(z),
                     "SOPInstanceUID": None if sop_uids is None else str(sop_uids[z]),
                     "starts": s.tolist(), "lengths": n.tolist(), "values": v.tolist()})
    return pd.DataFrame(rows, columns=["StudyInstanceUID", "slice_index", "SOPInstanceUID",
                                       "starts", "lengths", "values"])


_SCHEMA = pa.schema([("StudyInstanceUID", pa.string()), ("slice_index", pa.int32()),
                     ("SOPInstanceUID", pa.string()), ("starts", pa.list_(pa.int64())),
                     ("lengths", pa.list_(pa.int64())), ("values", pa.list_(pa.int64()))])


class PseudoMaskStore:
    """Read/write per-study pseudo-masks under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.parts = self.root / "parts"

    def part_path(self, study_uid: str) -> Path:
        if not _UID_RE.match(study_uid):
            raise ValueError(f"StudyInstanceUID {study_uid!r} is not usable as a file name under {self.parts}")
        return self.parts / f"{study_uid}.parquet"

    def done(self) -> set[str]:
        """Studies whose part file exists (finished: parts are written atomically)."""
        return {p.stem for p in self.parts.glob("*.parquet")} if self.parts.exists() else set()

    def pending(self, study_uids: Iterable[str]) -> list[str]:
        """``study_uids`` without the finished ones, order kept: what a resumed run still has to do."""
        finished = self.done()
        return [u for u in study_uids if u not in finished]

    def write(self, study_uid: str, labels: np.ndarray, sop_uids: Sequence[str] | None = None,
              extra: dict | None = None) -> Path:
        """Store one study's int label volume (z, y, x) atomically; ``extra`` (JSON-able) is kept
        in the metadata (e.g. teacher rounds per window)."""
        labels = np.asarray(labels)
        if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
            raise ValueError(f"pseudo-mask of {study_uid} must be integer labels, got {labels.dtype}")
        df = volume_to_frame(study_uid, labels.astype(np.int64), sop_uids)
        meta = {"shape": [int(s) for s in labels.shape], "n_voxels": int((labels > 0).sum()),
                "n_clusters": int(len(np.unique(labels[labels > 0]))), "extra": extra or {}}
        table = pa.Table.from_pandas(df, schema=_SCHEMA, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta)})
        path = self.part_path(study_uid)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path

    def _meta(self, path: Path) -> dict:
        md = pq.read_schema(path).metadata or {}
        if META_KEY not in md:
            raise ValueError(f"{path} is not a pseudo-mask part (no {META_KEY.decode()} metadata)")
        return json.loads(md[META_KEY])

    def read(self, study_uid: str) -> tuple[np.ndarray, list[str | None]]:
        """(int32 labels (z, y, x), SOPInstanceUID per slice or None where unknown)."""
        path = self.part_path(study_uid)
        if not path.exists():
            raise FileNotFoundError(f"no pseudo-mask for study {study_uid}: {path} does not exist")
        meta = self._meta(path)
        z_n, h, w = meta["shape"]
        labels = np.zeros((z_n, h, w), np.int32)
        sops: list[str | None] = [None] * z_n
        df = pq.read_table(path).to_pandas()
        for r in df.itertuples(index=False):
            labels[r.slice_index] = decode_rle(r.starts, r.lengths, r.values, (h, w))
            sops[r.slice_index] = r.SOPInstanceUID
        return labels, sops

    def write_index(self) -> pd.DataFrame:
        """Rebuild ``index.parquet`` (one row per finished study) from the parts' metadata."""
        rows = []
        for uid in sorted(self.done()):
            m = self._meta(self.part_path(uid))
            rows.append({"StudyInstanceUID": uid, "n_slices": m["shape"][0], "height": m["shape"][1],
                         "width": m["shape"][2], "n_voxels": m["n_voxels"], "n_clusters": m["n_clusters"],
                         "part": f"parts/{uid}.parquet"})
        cols = ["StudyInstanceUID", "n_slices", "height", "width", "n_voxels", "n_clusters", "part"]
        index = pd.DataFrame(rows, columns=cols)
        write_parquet_atomic(index, self.root / "index.parquet")
        return index

    def extra(self, study_uid: str) -> dict:
        """The ``extra`` metadata stored with a study."""
        return self._meta(self.part_path(study_uid))["extra"]


def export_masks_png(store: PseudoMaskStore, out_dir: str | Path, shapes: Mapping[str, tuple[int, int]],
                     studies: Iterable[str] | None = None) -> dict[str, int]:
    """The pseudo-masks as ``<SOPInstanceUID>.png`` files (uint8, 255 = embolus) at each slice's
    original size, the mask-folder input of the attention loss (CNNConfig.attention_source;
    pe.data.annotations): weak supervision without human boxes. Only slices with a voxel get a file
    (a slice without one is unannotated, as in the paper's sparse boxes). The cache frame (S, S)
    covers the whole image, so it is resized (nearest) to ``shapes[sop]`` (rows, cols). SOP ids
    are checked (:func:`pe.rspect.is_valid_uid`) before they become file names.
    Returns counts: studies, slices written, slices skipped (no SOP id or no shape)."""
    import cv2

    from pe.io import write_bytes_atomic
    from pe.rspect import is_valid_uid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"studies": 0, "written": 0, "skipped": 0}
    for study in sorted(store.done() if studies is None else studies):
        labels, sops = store.read(study)
        counts["studies"] += 1
        for k in np.flatnonzero(labels.reshape(len(labels), -1).max(axis=1) > 0):
            sop = sops[k]
            if sop is None or not is_valid_uid(sop) or sop not in shapes:
                counts["skipped"] += 1
                continue
            rows, cols = shapes[sop]
            m = cv2.resize((labels[k] > 0).astype(np.uint8) * 255, (int(cols), int(rows)),
                           interpolation=cv2.INTER_NEAREST)
            ok, buf = cv2.imencode(".png", m)
            if not ok:
                raise OSError(f"{out / f'{sop}.png'}: cannot encode the mask image")
            write_bytes_atomic(out / f"{sop}.png", buf.tobytes())
            counts["written"] += 1
    return counts
