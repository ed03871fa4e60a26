"""The metadata table of a split: one row per image from the DICOM headers (no pixel data), checked
against train.csv / test.csv (CONTRACTS.md row 01).

Slice order comes from ImagePositionPatient[2] (z), never from file names or InstanceNumber
(RSPECT.md): ``slice_index`` ranks the images of a study by ascending z, ties broken by
InstanceNumber then SOPInstanceUID so the order is stable.

A slice whose ImagePositionPatient is missing or unusable (not three finite numbers) is kept, since
its pixels may be fine, and its ``z`` is estimated (problem ``position_fallback``), first usable source
wins:

1. SliceLocation, mapped onto the z of the study's slices that have both (piecewise-linear between
   them, the straight-line fit beyond them; taken as z itself when no slice has both);
2. InstanceNumber, mapped onto z the same way, so the slice sits where its number places it
   within the series' known z order (ascending or descending numbering alike); with no positioned
   slice in the study, InstanceNumber itself;
3. neither: after the study's last slice.

Long runs resume: every finished chunk of files is kept in ``.<out name>.parts/`` beside the output
(keyed by the files' paths, sizes and modification times) until the table is written, so a run
that is stopped goes on where it was. Problems never crash the run and never drop data silently: every one is a row of
``<out stem>.problems.csv`` (file, StudyInstanceUID, problem, detail) and counted in the printed
summary line. Kinds:

| problem            | effect on the table                                                     |
|--------------------|-------------------------------------------------------------------------|
| not_dicom          | file excluded (not a DICOM file)                                         |
| unreadable         | file excluded (the header cannot be parsed)                              |
| missing_tag        | file excluded when an id, Rows or Columns is missing; else kept with a default |
| position_fallback  | kept: no usable ImagePositionPatient, z estimated (SliceLocation, InstanceNumber) |
| invalid_uid        | file (or label row) excluded: the id is neither RSPECT hex nor a DICOM UID, and ids become file names later |
| path_mismatch      | kept: the header's ids win over the folder / file names                   |
| duplicate_sop      | the second and later files with one SOPInstanceUID are excluded          |
| not_in_labels      | file excluded: its SOPInstanceUID is not in <split>.csv                   |
| missing_file       | a <split>.csv row with no parsed file (nothing to exclude)               |
| label_id_mismatch  | kept: <split>.csv gives another study/series than the header             |
| duplicate_z        | kept: two or more images of a study share a z position                   |
| multiple_series    | kept: a study has more than one series (RSPECT has one)                   |
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom import config as dicom_config
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from pe import rspect
from pe.io import write_csv_atomic, write_parquet_atomic

META_COLUMNS: tuple[str, ...] = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "path", "z", "slice_index", "n_slices",
    "rows", "columns", "pixel_spacing_row", "pixel_spacing_col", "slice_thickness", "rescale_slope",
    "rescale_intercept", "transfer_syntax",
)
PROBLEM_COLUMNS: tuple[str, ...] = ("file", "StudyInstanceUID", "problem", "detail")
PROBLEM_KINDS: tuple[str, ...] = (
    "not_dicom", "unreadable", "missing_tag", "invalid_uid", "path_mismatch", "duplicate_sop", "not_in_labels",
    "missing_file", "label_id_mismatch", "duplicate_z", "multiple_series", "position_fallback",
)
SPLITS: tuple[str, ...] = ("train", "test")
_CHUNK = 512  # files per task and per resume part: amortises inter-process traffic and part writes
_PARTS_VERSION = 2  # bump when the record layout changes, so stale parts are never reused

# One header, as parsed in a worker: a record, or None plus (problem, detail) pairs.
_Record = dict[str, object]


def problems_path(out: Path | str) -> Path:
    """``META.parquet`` -> ``META.problems.csv`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.problems.csv")


def list_files(root: Path) -> list[str]:
    """Every regular file under ``root`` (any name: non-DICOM files are reported, not skipped),
    sorted so the run is reproducible."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(found)


# Tags read as text straight from the raw bytes (Dataset.get_item returns the element unconverted):
# pydicom's value conversion and validation cost about a third of a header read.
_TAG = {
    "StudyInstanceUID": 0x0020000D, "SeriesInstanceUID": 0x0020000E, "SOPInstanceUID": 0x00080018,
    "ImagePositionPatient": 0x00200032, "InstanceNumber": 0x00200013, "PixelSpacing": 0x00280030,
    "SliceThickness": 0x00180050, "SliceLocation": 0x00201041, "RescaleSlope": 0x00281053, "RescaleIntercept": 0x00281052,
    "TransferSyntaxUID": 0x00020010,
}


def _text(ds: pydicom.Dataset, keyword: str) -> list[str] | None:
    """The values of a string element (UI, DS, IS) as stripped strings; None when absent or empty."""
    elem = ds.get_item(_TAG[keyword])
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        parts = [p.strip(" \0") for p in value.decode("latin-1").split("\\")]
    elif value is None:
        return None
    elif isinstance(value, str):
        parts = [value.strip(" \0")]
    else:  # an element pydicom already converted (MultiValue, number)
        try:
            parts = [str(v).strip() for v in value]
        except TypeError:
            parts = [str(value).strip()]
    return parts if any(parts) else None


def _ushort(ds: pydicom.Dataset, tag: int, little_endian: bool) -> int | None:
    """A US element (Rows, Columns) from its raw bytes; converted by pydicom only when needed."""
    elem = ds.get_item(tag)
    if elem is None or elem.value is None:
        return None
    if isinstance(elem.value, bytes) and len(elem.value) == 2 and little_endian:
        return int.from_bytes(elem.value, "little")
    value = ds[tag].value
    return None if value is None or value == b"" else int(value)


def _number(parts: list[str] | None, index: int = 0) -> float | None:
    """A finite number, or None (absent, not a number, NaN or infinite)."""
    try:
        value = float(parts[index])  # type: ignore[index]
    except (TypeError, ValueError, IndexError):
        return None
    return value if np.isfinite(value) else None


def _position_issue(parts: list[str] | None) -> str | None:
    """Why ImagePositionPatient cannot give z (None when it can)."""
    if parts is None:
        return "no ImagePositionPatient"
    if len(parts) != 3 or any(_number(parts, i) is None for i in range(3)):
        return f"unusable ImagePositionPatient {' / '.join(parts)[:60]!r}"
    return None


def read_header(path: str) -> tuple[_Record | None, list[tuple[str, str]]]:
    """Parse one file's header into a record; problems as (kind, detail) pairs. Never raises for a
    bad file: a record of None means the file is excluded."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as exc:
        return None, [("not_dicom", str(exc).splitlines()[0][:200])]
    except Exception as exc:  # any parser failure is a property of the file, reported per file
        return None, [("unreadable", f"{type(exc).__name__}: {exc}"[:200])]
    problems: list[tuple[str, str]] = []
    try:
        ids = {k: (_text(ds, k) or [""])[0] for k in rspect.ID_COLUMNS}
        position = _text(ds, "ImagePositionPatient")
        issue = _position_issue(position)
        z = None if issue else _number(position, 2)
        syntax = (_text(ds.file_meta, "TransferSyntaxUID") or [""])[0] if hasattr(ds, "file_meta") else ""
        little = syntax != "1.2.840.10008.1.2.2"  # Explicit VR Big Endian (retired) is the only other
        rows, cols = _ushort(ds, 0x00280010, little), _ushort(ds, 0x00280011, little)
        missing = [k for k, v in ids.items() if not v]
        missing += [k for k, v in (("Rows", rows), ("Columns", cols)) if v is None]
        if missing:
            return None, [("missing_tag", "missing " + ", ".join(missing))]
        bad = [f"{k}={v!r}" for k, v in ids.items() if not rspect.is_valid_uid(v)]
        if bad:
            return None, [("invalid_uid", "; ".join(bad)[:200])]
        spacing = _text(ds, "PixelSpacing")
        slope, intercept = _number(_text(ds, "RescaleSlope")), _number(_text(ds, "RescaleIntercept"))
        if slope is None or intercept is None:
            problems.append(("missing_tag", "no RescaleSlope/RescaleIntercept: using 1 and 0"))
        record: _Record = {
            **ids, "path": os.path.abspath(path), "z": z, "instance_number": _number(_text(ds, "InstanceNumber")),
            "rows": int(rows), "columns": int(cols),
            "pixel_spacing_row": _number(spacing, 0), "pixel_spacing_col": _number(spacing, 1),
            "slice_thickness": _number(_text(ds, "SliceThickness")),
            "rescale_slope": 1.0 if slope is None else slope, "rescale_intercept": 0.0 if intercept is None else intercept,
            "transfer_syntax": syntax, "slice_location": _number(_text(ds, "SliceLocation")),
            "position_issue": issue,
        }
    except Exception as exc:  # a malformed value deep in the header
        return None, [("unreadable", f"{type(exc).__name__}: {exc}"[:200])]
    p = Path(path)
    expected = {"SOPInstanceUID": p.stem, "SeriesInstanceUID": p.parent.name, "StudyInstanceUID": p.parent.parent.name}
    diff = [f"{k}: header {ids[k]} vs path {v}" for k, v in expected.items() if ids[k] != v]
    if diff:
        problems.append(("path_mismatch", "; ".join(diff)))
    return record, problems


def _parse_chunk(paths: list[str]) -> list[tuple[str, _Record | None, list[tuple[str, str]]]]:
    # Real RSPECT headers hold 12-hex ids in UI elements: pydicom's value validation would warn on
    # every one of them, so it is off here; ids are checked with rspect.is_valid_uid instead.
    with dicom_config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [(p, *read_header(p)) for p in paths]


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def parts_dir(out: Path | str) -> Path:
    """Where finished chunks are kept while a parse runs, so an interrupted run resumes."""
    out = Path(out)
    return out.with_name(f".{out.name}.parts")


def _chunk_key(paths: list[str]) -> str:
    """Names a chunk by its files' paths, sizes and modification times: a changed file re-parses."""
    h = hashlib.sha1(f"v{_PARTS_VERSION}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # a dangling link: reported as unreadable by the parser
            h.update(f"{p}\0-\n".encode())
    return h.hexdigest()[:24]


def _save_part(path: Path, results: list[tuple[str, _Record | None, list[tuple[str, str]]]]) -> None:
    df = pd.DataFrame({"file": [r[0] for r in results], "record": [json.dumps(r[1]) for r in results],
                       "problems": [json.dumps(r[2]) for r in results]})
    write_parquet_atomic(df, path)


def _load_part(path: Path) -> list[tuple[str, _Record | None, list[tuple[str, str]]]]:
    df = pd.read_parquet(path)
    return [(f, json.loads(r), [tuple(p) for p in json.loads(q)])  # type: ignore[misc]
            for f, r, q in zip(df["file"], df["record"], df["problems"], strict=True)]


def _parse_all(paths: list[str], workers: int, desc: str, parts: Path,
               ) -> list[tuple[str, _Record | None, list[tuple[str, str]]]]:
    """Parse every file, chunk by chunk; chunks finished by an earlier, interrupted run are loaded
    from ``parts`` instead of parsed again."""
    chunks = list(_chunks(paths, _CHUNK))
    keys = [_chunk_key(c) for c in chunks]
    done: dict[int, list] = {}
    if parts.is_dir():
        for i, k in enumerate(keys):
            if (parts / f"{k}.parquet").exists():
                done[i] = _load_part(parts / f"{k}.parquet")
    todo = [i for i in range(len(chunks)) if i not in done]
    parts.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(paths), desc=desc, unit="file", mininterval=1.0, disable=len(paths) < 2000,
              initial=sum(len(chunks[i]) for i in done)) as bar:
        if workers <= 1 or len(todo) <= 1:
            results: Iterable = map(_parse_chunk, (chunks[i] for i in todo))
            pool = None
        else:
            pool = get_context().Pool(workers)
            results = pool.imap(_parse_chunk, (chunks[i] for i in todo), chunksize=1)
        try:
            for i, res in zip(todo, results, strict=True):  # imap keeps the order of the chunks
                _save_part(parts / f"{keys[i]}.parquet", res)
                done[i] = res
                bar.update(len(res))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    return [r for i in range(len(chunks)) for r in done[i]]


def _read_labels(data_dir: Path, split: str) -> pd.DataFrame:
    path = data_dir / f"{split}.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (every split needs its <split>.csv, RSPECT.md)")
    labels = pd.read_csv(path, dtype={c: str for c in rspect.ID_COLUMNS})
    need = rspect.TRAIN_COLUMNS if split == "train" else rspect.TEST_COLUMNS
    absent = [c for c in need if c not in labels.columns]
    if absent:
        raise ValueError(f"{path}: missing columns {absent}")
    return labels[list(need)]


def _map_onto_z(x_known: np.ndarray, z_known: np.ndarray, x_new: np.ndarray) -> np.ndarray:
    """z for ``x_new`` from the (x, z) pairs of positioned slices: piecewise-linear inside their x
    range (follows wrap-arounds and gaps of the numbering), their straight-line fit outside it."""
    xs, first = np.unique(x_known, return_index=True)
    zs = z_known[first]
    if len(xs) == 0:
        return x_new.astype(float)
    if len(xs) == 1:  # one positioned slice: direction unknown, keep the spacing of the numbers
        return zs[0] + (x_new - xs[0])
    slope, intercept = np.polyfit(xs, zs, 1)
    inside = (x_new >= xs[0]) & (x_new <= xs[-1])
    return np.where(inside, np.interp(x_new, xs, zs), slope * x_new + intercept)


def _estimate_z(meta: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str, str, str]]]:
    """Fill ``z`` of the slices without a usable ImagePositionPatient (module docstring: SliceLocation,
    then InstanceNumber, then after the last slice); one ``position_fallback`` problem per slice."""
    problems: list[tuple[str, str, str, str]] = []
    lost = meta["z"].isna()
    if not lost.any():
        return meta, problems
    meta = meta.copy()
    for study in meta.loc[lost, "StudyInstanceUID"].unique():
        rows = meta["StudyInstanceUID"] == study
        known = rows & ~lost
        for col, name in (("slice_location", "SliceLocation"), ("instance_number", "InstanceNumber")):
            todo = rows & meta["z"].isna() & meta[col].notna()
            if not todo.any():
                continue
            pairs = known & meta[col].notna()
            meta.loc[todo, "z"] = _map_onto_z(meta.loc[pairs, col].to_numpy(float), meta.loc[pairs, "z"].to_numpy(float),
                                              meta.loc[todo, col].to_numpy(float))
            how = (f"mapped onto the z of {int(pairs.sum())} positioned slice(s)" if pairs.any()
                   else "taken as z (no slice of the study has both)")
            for i in meta.index[todo]:
                problems.append((meta.at[i, "path"], study, "position_fallback",
                                 f"{meta.at[i, 'position_issue']}: z={meta.at[i, 'z']:.3f} from {name} "
                                 f"{meta.at[i, col]:g}, {how}"))
        rest = meta.index[rows & meta["z"].isna()]
        top = meta.loc[rows, "z"].max()
        for j, i in enumerate(rest):
            meta.at[i, "z"] = (0.0 if pd.isna(top) else float(top)) + 1.0 + j
            problems.append((meta.at[i, "path"], study, "position_fallback",
                             f"{meta.at[i, 'position_issue']}, no SliceLocation or InstanceNumber: placed after "
                             f"the study's last slice (z={meta.at[i, 'z']:.3f})"))
    return meta, problems


def _assign_slice_index(df: pd.DataFrame) -> pd.DataFrame:
    df = df.sort_values(["StudyInstanceUID", "z", "instance_number", "SOPInstanceUID"], kind="stable",
                        na_position="last").reset_index(drop=True)
    df["slice_index"] = df.groupby("StudyInstanceUID", sort=False).cumcount().astype("int64")
    df["n_slices"] = df.groupby("StudyInstanceUID", sort=False)["SOPInstanceUID"].transform("size").astype("int64")
    return df


def _empty_meta(split: str) -> pd.DataFrame:
    cols = list(META_COLUMNS) + ([c for c in rspect.TRAIN_COLUMNS if c not in rspect.ID_COLUMNS] if split == "train" else [])
    return pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})


def _match_labels(meta: pd.DataFrame, labels: pd.DataFrame, split: str,
                  problems: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    """Check the label rows' ids, drop files not in <split>.csv, report rows without a file and ids
    that disagree with the header, and join the labels (appends to ``problems``)."""
    # Label rows: ids must be valid before they are ever matched or used.
    bad_ids = ~labels[list(rspect.ID_COLUMNS)].map(rspect.is_valid_uid).all(axis=1)
    for i, r in labels[bad_ids].iterrows():
        problems.append((f"{split}.csv:{i + 2}", str(r["StudyInstanceUID"]), "invalid_uid",
                         f"row ids {r[list(rspect.ID_COLUMNS)].tolist()}"))
    labels = labels[~bad_ids]
    label_sops = set(labels["SOPInstanceUID"])
    file_sops = set(meta["SOPInstanceUID"])
    orphan = ~meta["SOPInstanceUID"].isin(label_sops)
    for _, r in meta[orphan].iterrows():
        problems.append((r["path"], r["StudyInstanceUID"], "not_in_labels",
                         f"SOPInstanceUID {r['SOPInstanceUID']} not in {split}.csv: excluded"))
    meta = meta[~orphan]
    for _, r in labels[~labels["SOPInstanceUID"].isin(file_sops)].iterrows():
        problems.append(("", r["StudyInstanceUID"], "missing_file",
                         f"{split}.csv lists SOPInstanceUID {r['SOPInstanceUID']} but no readable file has it"))

    # Join the labels; ids in the csv must agree with the header's.
    lab = labels.drop_duplicates("SOPInstanceUID").rename(
        columns={"StudyInstanceUID": "_csv_study", "SeriesInstanceUID": "_csv_series"})
    meta = meta.merge(lab, on="SOPInstanceUID", how="left", validate="one_to_one")
    wrong = (meta["_csv_study"] != meta["StudyInstanceUID"]) | (meta["_csv_series"] != meta["SeriesInstanceUID"])
    for _, r in meta[wrong].iterrows():
        problems.append((r["path"], r["StudyInstanceUID"], "label_id_mismatch",
                         f"{split}.csv: study {r['_csv_study']} series {r['_csv_series']}; header: study "
                         f"{r['StudyInstanceUID']} series {r['SeriesInstanceUID']}"))
    return meta.drop(columns=["_csv_study", "_csv_series"])


def parse_metadata(data_dir: Path | str, split: str, out: Path | str, workers: int = 1) -> pd.DataFrame:
    """Parse every header of ``data_dir/split``, check it against ``data_dir/<split>.csv``, write the
    table to ``out`` (parquet) and the problems beside it; return the table."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data_dir = Path(data_dir)
    root = data_dir / split
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected the Kaggle layout, RSPECT.md)")
    labels = _read_labels(data_dir, split)
    paths = list_files(root)
    parsed = _parse_all(paths, workers, desc=f"headers {split}", parts=parts_dir(out))

    problems: list[tuple[str, str, str, str]] = []
    records: list[_Record] = []
    for path, rec, probs in parsed:
        study = str(rec["StudyInstanceUID"]) if rec else ""
        problems.extend((path, study, kind, detail) for kind, detail in probs)
        if rec is not None:
            records.append(rec)
    meta = pd.DataFrame.from_records(records, columns=[c for c in META_COLUMNS if c not in ("slice_index", "n_slices")]
                                     + ["instance_number", "slice_location", "position_issue"])
    meta["z"] = meta["z"].astype("float64")

    # One file per SOPInstanceUID: later duplicates (in path order) are reported and excluded.
    dup = meta.duplicated("SOPInstanceUID", keep="first")
    for _, r in meta[dup].iterrows():
        problems.append((r["path"], r["StudyInstanceUID"], "duplicate_sop", f"SOPInstanceUID {r['SOPInstanceUID']} "
                         "already read from another file"))
    meta = meta[~dup]

    meta = _match_labels(meta, labels, split, problems)
    meta, fallback = _estimate_z(meta)
    problems.extend(fallback)
    # Study-level checks on what is kept (vectorised: 7,279 studies and 1.79 M rows on RSPECT).
    n_series = meta.groupby("StudyInstanceUID")["SeriesInstanceUID"].nunique()
    for study in n_series[n_series > 1].index:
        g = meta[meta["StudyInstanceUID"] == study]
        problems.append((str(Path(g["path"].iloc[0]).parent.parent), str(study), "multiple_series",
                         "; ".join(f"{s}: {n} images" for s, n in g["SeriesInstanceUID"].value_counts().items())))
    dz = meta[meta.duplicated(["StudyInstanceUID", "z"], keep=False)]
    for (study, z), g in dz.groupby(["StudyInstanceUID", "z"], sort=True):
        files = sorted(Path(p).name for p in g["path"])
        problems.append((str(Path(g["path"].iloc[0]).parent), str(study), "duplicate_z",
                         f"z={z:g} shared by {len(g)} images: {' '.join(files[:5])}"))

    meta = _assign_slice_index(meta) if len(meta) else _empty_meta(split)
    extra = [c for c in rspect.TRAIN_COLUMNS if c not in rspect.ID_COLUMNS] if split == "train" else []
    meta = meta[list(META_COLUMNS) + extra].reset_index(drop=True)
    for c in extra:
        meta[c] = meta[c].astype("int64")

    prob = pd.DataFrame(problems, columns=list(PROBLEM_COLUMNS))
    write_parquet_atomic(meta, out)
    write_csv_atomic(prob, problems_path(out))
    shutil.rmtree(parts_dir(out), ignore_errors=True)  # complete: nothing left to resume
    counts = Counter(prob["problem"])
    detail = ", ".join(f"{k}={counts[k]}" for k in PROBLEM_KINDS if counts[k]) or "none"
    print(f"{split}: {len(meta)} images in {meta['StudyInstanceUID'].nunique()} studies from {len(paths)} files; "
          f"problems: {len(prob)} ({detail}) -> {problems_path(out)}")
    return meta


def check_sorted(meta: pd.DataFrame) -> None:
    """Raise when a table breaks the contract: slice_index 0..n-1 by ascending z within each study."""
    for study, g in meta.groupby("StudyInstanceUID", sort=False):
        idx = g["slice_index"].to_numpy()
        if not np.array_equal(idx, np.arange(len(g))) or (np.diff(g["z"].to_numpy()) < 0).any():
            raise ValueError(f"study {study}: slice_index is not 0..n-1 by ascending z")
