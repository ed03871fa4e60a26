"""Submission row ids: the one place that builds, parses and aligns them.

An image row's id is its SOPInstanceUID; an exam row's id is ``<StudyInstanceUID>_<label>``
(shared/RSPECT.md). The label names come from :mod:`pe.rspect`. Parsing matches the longest label
first, because ``acute_and_chronic_pe`` also ends with ``_chronic_pe``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pe.rspect import EXAM_LABELS, IMAGE_LABEL

SEPARATOR = "_"
_N_SHOW = 5  # how many offending ids an error message names


def first_ids(ids: Sequence[object] | np.ndarray | pd.Index, n: int = _N_SHOW) -> str:
    """The first ``n`` ids, comma-separated, for error messages."""
    return ", ".join(map(str, list(ids[:n])))


def exam_row_id(study_uid: str, label: str) -> str:
    """Submission id of an exam row: ``<StudyInstanceUID>_<label>``."""
    return f"{study_uid}{SEPARATOR}{label}"


def split_exam_row_id(row_id: str) -> tuple[str, str] | None:
    """Inverse of :func:`exam_row_id`; None for an image row id (a bare SOPInstanceUID)."""
    for label in sorted(EXAM_LABELS, key=len, reverse=True):
        suffix = SEPARATOR + label
        if row_id.endswith(suffix):
            return row_id[: -len(suffix)], label
    return None


def exam_ids(study_ids: np.ndarray | pd.Series | Sequence[str]) -> np.ndarray:
    """(n_studies, 9) object array of exam-row ids in ``EXAM_LABELS`` order."""
    studies = np.asarray(study_ids).astype(str).astype(object)
    return (studies[:, None] + SEPARATOR + np.asarray(EXAM_LABELS, dtype=object)[None, :]).astype(object)


def label_of_ids(ids: pd.Series | np.ndarray | Sequence[str]) -> np.ndarray:
    """Label name of every submission id (exam ids by suffix, everything else the image label)."""
    s = pd.Series(np.asarray(ids, dtype=object)).astype(str)
    out = np.full(len(s), IMAGE_LABEL, dtype=object)
    # Longest suffix last, so it overwrites the shorter one it contains.
    for lab in sorted(EXAM_LABELS, key=len):
        out[s.str.endswith(SEPARATOR + lab).to_numpy()] = lab
    return out


def studies_of_ids(ids: np.ndarray | Sequence[str]) -> np.ndarray:
    """Unique StudyInstanceUIDs named by the exam-row ids among ``ids`` (first-seen order)."""
    ids = np.asarray(ids, dtype=object)
    labels = label_of_ids(ids)
    exam = labels != IMAGE_LABEL
    suffix_len = pd.Series(labels[exam]).str.len().to_numpy() + len(SEPARATOR)
    return pd.unique(np.array([i[:-n] for i, n in zip(ids[exam], suffix_len, strict=True)], dtype=object))


def to_arrow_strings(ids: pd.Series | np.ndarray | Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """Ids as one Arrow large_string array (pandas 3 string columns convert almost for free)."""
    if isinstance(ids, pa.Array | pa.ChunkedArray):
        arr = ids
    elif isinstance(ids, pd.Series):
        arr = pa.array(ids if pd.api.types.is_string_dtype(ids) else ids.astype(str))
    else:
        obj = np.asarray(ids, dtype=object)
        try:
            arr = pa.array(obj, type=pa.large_string())
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # non-string ids (e.g. parsed as numbers)
            arr = pa.array(obj.astype(str).astype(object), type=pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.cast(pa.large_string())


def match_ids(pred_ids: pd.Series | np.ndarray | pa.Array, ref_ids: np.ndarray | pa.Array) -> np.ndarray:
    """Position in ``pred_ids`` of every id of ``ref_ids`` (-1 when absent); ValueError naming them
    when ``pred_ids`` holds duplicates. One hashing pass over both (pyarrow dictionary encoding, the
    fastest of the options measured for 1.8 M string ids)."""
    a = to_arrow_strings(pred_ids)
    m = len(a)
    enc = pc.dictionary_encode(pa.concat_arrays([a, to_arrow_strings(ref_ids)]))
    codes = enc.indices.to_numpy(zero_copy_only=False)
    pcodes = codes[:m]
    counts = np.bincount(pcodes, minlength=len(enc.dictionary))
    if m and counts.max() > 1:
        dup = enc.dictionary.take(pa.array(np.flatnonzero(counts > 1))).to_pylist()
        raise ValueError(f"prediction has {len(dup)} duplicated ids, e.g. {first_ids(dup)}")
    pos = np.full(len(enc.dictionary), -1, dtype=np.int64)
    pos[pcodes] = np.arange(m)
    return pos[codes[m:]]
