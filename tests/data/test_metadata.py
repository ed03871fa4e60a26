"""Metadata parsing: the table of CONTRACTS.md row 01 on the phantom, and one test per problem kind
on a deliberately broken copy (problems are reported and never crash the run)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import config as dicom_config

from pe import rspect
from pe.data import metadata
from pe.synthetic import phantom

LABEL_COLUMNS = [c for c in rspect.TRAIN_COLUMNS if c not in rspect.ID_COLUMNS]


@pytest.fixture(autouse=True)
def _hex_ids_read_quietly():
    with dicom_config.disable_value_validation():  # 12-hex ids are not DICOM UIDs: no warnings
        yield


def test_phantom_table(phantom_dir: Path, phantom_meta: dict[str, Path]) -> None:
    train = pd.read_csv(phantom_dir / "train.csv", dtype={c: str for c in rspect.ID_COLUMNS})
    meta = pd.read_parquet(phantom_meta["train"])
    assert list(meta.columns) == list(metadata.META_COLUMNS) + LABEL_COLUMNS
    assert len(meta) == len(train) and meta["SOPInstanceUID"].is_unique
    assert pd.read_csv(metadata.problems_path(phantom_meta["train"])).empty  # a clean phantom
    # Sorted by study then slice_index; slice_index 0..n-1 by ascending z.
    assert meta["StudyInstanceUID"].is_monotonic_increasing
    metadata.check_sorted(meta)
    assert (meta.groupby("StudyInstanceUID")["n_slices"].first() == meta.groupby("StudyInstanceUID").size()).all()
    # Labels joined by SOPInstanceUID, ids as in train.csv.
    merged = meta.merge(train, on="SOPInstanceUID", suffixes=("", "_csv"))
    assert len(merged) == len(meta)
    for c in LABEL_COLUMNS + ["StudyInstanceUID", "SeriesInstanceUID"]:
        assert (merged[c] == merged[f"{c}_csv"]).all(), c
    # Paths are absolute and name the file; header fields agree with the file.
    row = meta.iloc[len(meta) // 2]
    assert Path(row["path"]).is_absolute() and Path(row["path"]).stem == row["SOPInstanceUID"]
    ds = pydicom.dcmread(row["path"], stop_before_pixels=True)
    assert float(ds.ImagePositionPatient[2]) == row["z"] and ds.Rows == row["rows"] == 128
    assert float(ds.RescaleIntercept) == row["rescale_intercept"]
    assert str(ds.file_meta.TransferSyntaxUID) == row["transfer_syntax"]
    assert row["pixel_spacing_row"] > 0 and row["slice_thickness"] > 0
    test = pd.read_parquet(phantom_meta["test"])
    assert list(test.columns) == list(metadata.META_COLUMNS)
    assert set(test["SOPInstanceUID"]) == set(pd.read_csv(phantom_dir / "test.csv", dtype=str)["SOPInstanceUID"])


def test_slice_order_is_z_not_instance_number(phantom_dir: Path, phantom_meta: dict[str, Path]) -> None:
    meta = pd.read_parquet(phantom_meta["train"])
    truth = pd.read_csv(phantom_dir / phantom.TRUTH_FILE).set_index("StudyInstanceUID")
    seen = set()
    for study, g in meta.groupby("StudyInstanceUID"):
        inst = np.array([int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in g["path"]])
        order = truth.loc[study, "instance_order"]
        if order == "z_ascending":
            assert (np.diff(inst) > 0).all()
        elif order == "z_descending":  # InstanceNumber runs against z: slice_index must not follow it
            assert (np.diff(inst) < 0).all()
        seen.add(order)
        # The image labels follow the anatomy: positives sit in runs of consecutive slices.
        pos = g["pe_present_on_image"].to_numpy()
        if pos.any():
            runs = np.flatnonzero(np.diff(np.r_[0, pos, 0]) == 1)
            assert len(runs) <= truth.loc[study, "n_emboli"]  # one run per embolus at most
    assert {"z_ascending", "z_descending"} <= seen


def _copy_small_phantom(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    phantom.make_phantom(src, train_studies=3, test_studies=1, seed=5, size=32, min_slices=5, max_slices=6)
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, out: Path | None = None, **changes) -> None:
    ds = pydicom.dcmread(path)
    for k, v in changes.items():
        if v is None:
            del ds[k]
        else:
            setattr(ds, k, v)
            if k == "SOPInstanceUID":
                ds.file_meta.MediaStorageSOPInstanceUID = v
    ds.save_as(out or path, enforce_file_format=True)


def test_every_problem_is_reported_and_nothing_crashes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _copy_small_phantom(tmp_path)
    train = pd.read_csv(data / "train.csv", dtype=str)
    studies = sorted(train["StudyInstanceUID"].unique())
    s0 = train[train["StudyInstanceUID"] == studies[0]]
    s1 = train[train["StudyInstanceUID"] == studies[1]]
    s2 = train[train["StudyInstanceUID"] == studies[2]]

    def f(r) -> Path:
        return data / "train" / r.StudyInstanceUID / r.SeriesInstanceUID / f"{r.SOPInstanceUID}.dcm"

    rows0, rows1, rows2 = list(s0.itertuples()), list(s1.itertuples()), list(s2.itertuples())
    folder0 = f(rows0[0]).parent
    (folder0 / "notes.txt").write_text("not a DICOM file\n")  # not_dicom
    (folder0 / "aaaaaaaaaaaa.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"x" * 40)
    (folder0 / "eeeeeeeeeeee.dcm").symlink_to(tmp_path / "gone.dcm")  # unreadable: a dangling link
    f(rows0[0]).unlink()  # missing_file
    _rewrite(f(rows0[1]), folder0 / "bbbbbbbbbbbb.dcm", SOPInstanceUID="bbbbbbbbbbbb")  # not_in_labels
    shutil.copy(f(rows0[2]), folder0 / "cccccccccccc.dcm")  # duplicate_sop (+ path_mismatch)
    z_other = pydicom.dcmread(f(rows1[1])).ImagePositionPatient
    _rewrite(f(rows1[0]), ImagePositionPatient=z_other)  # duplicate_z
    _rewrite(f(rows1[2]), SeriesInstanceUID="dddddddddddd")  # multiple_series, label_id_mismatch, path
    _rewrite(f(rows2[0]), SOPInstanceUID="../../etc/x")  # invalid_uid in a header
    _rewrite(f(rows2[1]), ImagePositionPatient=None)  # position_fallback: kept
    bad_row = {**train.iloc[0].to_dict(), "SOPInstanceUID": "not a uid!", }
    pd.concat([train, pd.DataFrame([bad_row])]).to_csv(data / "train.csv", index=False)  # invalid_uid in csv

    out = tmp_path / "meta" / "train.parquet"
    meta = metadata.parse_metadata(data, "train", out, workers=1)
    prob = pd.read_csv(metadata.problems_path(out), dtype=str, keep_default_na=False)
    assert list(prob.columns) == list(metadata.PROBLEM_COLUMNS)
    kinds = prob.groupby("problem")["file"].apply(list).to_dict()
    assert set(kinds) == set(metadata.PROBLEM_KINDS)
    assert [Path(p).name for p in kinds["not_dicom"]] == ["notes.txt"]
    assert [Path(p).name for p in kinds["unreadable"]] == ["eeeeeeeeeeee.dcm"]
    # Files in train.csv with no usable file: the deleted one and the two excluded below.
    missing = prob.loc[prob["problem"] == "missing_file", "detail"].str.extract(r"SOPInstanceUID (\S+)")[0]
    assert set(missing) == {rows0[0].SOPInstanceUID, rows2[0].SOPInstanceUID}
    assert [Path(p).name for p in kinds["not_in_labels"]] == ["bbbbbbbbbbbb.dcm"]
    assert [Path(p).name for p in kinds["duplicate_sop"]] == ["cccccccccccc.dcm"]
    assert prob.loc[prob["problem"] == "duplicate_z", "StudyInstanceUID"].tolist() == [studies[1]]
    assert prob.loc[prob["problem"] == "multiple_series", "StudyInstanceUID"].tolist() == [studies[1]]
    assert prob.loc[prob["problem"] == "label_id_mismatch", "StudyInstanceUID"].tolist() == [studies[1]]
    assert any(Path(p) == f(rows2[0]) for p in kinds["invalid_uid"]) and any("train.csv" in p for p in kinds["invalid_uid"])
    # A header with no ids at all (garbage after the preamble); the slice without z is kept.
    assert [Path(p).name for p in kinds["missing_tag"]] == ["aaaaaaaaaaaa.dcm"]
    assert [Path(p) for p in kinds["position_fallback"]] == [f(rows2[1])]
    assert {Path(p).name for p in kinds["path_mismatch"]} == {"cccccccccccc.dcm", f(rows1[2]).name}

    # Excluded: the non-DICOM files, the orphan, the duplicate, the invalid id.
    assert "../../etc/x" not in set(meta["SOPInstanceUID"]) and "bbbbbbbbbbbb" not in set(meta["SOPInstanceUID"])
    assert len(meta) == len(train) - 1 - 1  # minus the deleted file and the invalid header id
    assert rows2[1].SOPInstanceUID in set(meta["SOPInstanceUID"])
    assert meta["SOPInstanceUID"].is_unique
    metadata.check_sorted(meta)
    # Kept with the header's ids: the extra series and the duplicate z.
    assert set(meta.loc[meta["StudyInstanceUID"] == studies[1], "SeriesInstanceUID"]) == {
        rows1[0].SeriesInstanceUID, "dddddddddddd"}
    summary = capsys.readouterr().out
    assert f"problems: {len(prob)}" in summary and "duplicate_z=1" in summary


def test_parallel_equals_serial_and_script(phantom_dir: Path, phantom_meta: dict[str, Path], tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("parse_script",
                                                  Path(__file__).parents[2] / "src" / "01_parse_metadata.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "m" / "train.parquet"
    assert mod.main(["--data-dir", str(phantom_dir), "--split", "train", "--out", str(out), "--workers", "2"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(phantom_meta["train"]))
    assert metadata.problems_path(out).exists()


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        metadata.parse_metadata(tmp_path, "train", tmp_path / "m.parquet")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="train.csv"):
        metadata.parse_metadata(tmp_path, "train", tmp_path / "m.parquet")
    pd.DataFrame(columns=list(rspect.TRAIN_COLUMNS)).to_csv(tmp_path / "train.csv", index=False)
    empty = metadata.parse_metadata(tmp_path, "train", tmp_path / "m.parquet")
    assert empty.empty and list(empty.columns) == list(metadata.META_COLUMNS) + LABEL_COLUMNS
    with pytest.raises(ValueError, match="split"):
        metadata.parse_metadata(tmp_path, "valid", tmp_path / "m.parquet")


def test_interrupted_parse_resumes(phantom_dir: Path, phantom_meta: dict[str, Path], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metadata, "_CHUNK", 40)
    real = metadata._parse_chunk
    calls: list[int] = []

    def crash_after_two(paths: list[str]):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the run
        calls.append(len(paths))
        return real(paths)

    out = tmp_path / "train.parquet"
    monkeypatch.setattr(metadata, "_parse_chunk", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        metadata.parse_metadata(phantom_dir, "train", out)
    assert not out.exists() and len(list(metadata.parts_dir(out).glob("*.parquet"))) == 2
    n_files = len(metadata.list_files(phantom_dir / "train"))
    calls.clear()
    monkeypatch.setattr(metadata, "_parse_chunk", lambda paths: calls.append(len(paths)) or real(paths))
    meta = metadata.parse_metadata(phantom_dir, "train", out)
    assert sum(calls) == n_files - 80  # only what the first run had not finished
    pd.testing.assert_frame_equal(meta, pd.read_parquet(phantom_meta["train"]))
    assert not metadata.parts_dir(out).exists()


def test_slices_without_position_are_kept_and_placed_by_fallback(phantom_dir: Path, phantom_meta: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """No ImagePositionPatient: SliceLocation places the slice; without SliceLocation too, InstanceNumber
    places it within the series' z order (ascending and descending numbering); with neither, last."""
    truth = pd.read_csv(phantom_dir / phantom.TRUTH_FILE).set_index("StudyInstanceUID")
    ref = pd.read_parquet(phantom_meta["train"])
    picked = {o: next(s for s in sorted(ref["StudyInstanceUID"].unique()) if truth.loc[s, "instance_order"] == o)
              for o in ("z_ascending", "z_descending")}
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    shutil.copy(phantom_dir / "train.csv", data / "train.csv")
    for study in picked.values():
        shutil.copytree(phantom_dir / "train" / study, data / "train" / study)
    ref = ref[ref["StudyInstanceUID"].isin(picked.values())].set_index("SOPInstanceUID")
    train = pd.read_csv(data / "train.csv", dtype=str)
    train[train["StudyInstanceUID"].isin(picked.values())].to_csv(data / "train.csv", index=False)

    def file_at(study: str, k: int) -> tuple[str, Path]:
        r = ref[(ref["StudyInstanceUID"] == study) & (ref["slice_index"] == k)].iloc[0]
        return str(r.name), data / "train" / study / r["SeriesInstanceUID"] / f"{r.name}.dcm"

    asc, desc = picked["z_ascending"], picked["z_descending"]
    by_loc = file_at(asc, 3)
    _rewrite(by_loc[1], ImagePositionPatient=None, SliceLocation=f"{ref.loc[by_loc[0], 'z']:.3f}")
    by_num = [file_at(asc, 5), file_at(desc, 4), file_at(desc, 0)]
    for _, f in by_num:
        ds = pydicom.dcmread(f)
        for tag in ("ImagePositionPatient", "SliceLocation"):
            if tag in ds:
                del ds[tag]
        ds.save_as(f, enforce_file_format=True)
    _rewrite(file_at(desc, 7)[1], ImagePositionPatient=["1", "2", "nan"])  # unusable
    nothing = file_at(asc, 1)
    ds = pydicom.dcmread(nothing[1])
    for tag in ("ImagePositionPatient", "SliceLocation", "InstanceNumber"):
        if tag in ds:
            del ds[tag]
    ds.save_as(nothing[1], enforce_file_format=True)

    out = tmp_path / "meta.parquet"
    meta = metadata.parse_metadata(data, "train", out, workers=1).set_index("SOPInstanceUID")
    assert set(meta.index) == set(ref.index)  # every slice kept
    metadata.check_sorted(meta.reset_index())
    prob = pd.read_csv(metadata.problems_path(out), dtype=str)
    flagged = prob[prob["problem"] == "position_fallback"]
    assert sorted(flagged["file"]) == sorted(str(f) for _, f in [by_loc, *by_num, nothing, file_at(desc, 7)])
    assert "SliceLocation" in flagged.set_index("file").loc[str(by_loc[1]), "detail"]
    assert all("InstanceNumber" in flagged.set_index("file").loc[str(f), "detail"] for _, f in by_num)
    assert "unusable" in flagged.set_index("file").loc[str(file_at(desc, 7)[1]), "detail"]
    # Every slice except the one with no clue at all keeps its true place; that one goes last.
    moved = ref.drop(index=nothing[0])
    for study in picked.values():
        g = meta[meta["StudyInstanceUID"] == study].drop(index=nothing[0], errors="ignore")
        want = moved[moved["StudyInstanceUID"] == study].sort_values("slice_index").index.tolist()
        assert g.sort_values("slice_index").index.tolist() == want, study
    assert meta.loc[nothing[0], "slice_index"] == meta.loc[nothing[0], "n_slices"] - 1
