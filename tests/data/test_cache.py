"""3-window JPEG cache: layout, z order, index, resume, corrupt slices, shards, lung boxes, JPEG error."""

from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path

import data_store
import numpy as np
import pandas as pd
import pydicom
import pytest

from pe.anatomy.roi import ROI_COLUMNS
from pe.data import cache as pc
from pe.data.dicom import read_hu
from pe.data.windows import window_rgb, window_rgb_reference

DATA = Path(data_store.__file__).parent / "data"
REPO = Path(__file__).resolve().parents[2]


@functools.cache
def _template() -> pydicom.Dataset:
    return pydicom.dcmread(DATA / "693_UNCR.dcm")


def write_ct(path: Path, hu: np.ndarray, z: float, study: str, sop: str, intercept: int = -1024) -> None:
    """An uncompressed CT slice (template: pydicom-data's real 693_UNCR.dcm) holding ``hu``."""
    ds = copy.deepcopy(_template())
    px = np.round(hu - intercept).astype(np.int16)
    ds.Rows, ds.Columns = px.shape
    ds.PixelData = px.tobytes()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = study + ".1"
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def chest_slice(s: int, t: float, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A chest-like HU slice (s×s) at relative height t in [0, 1] and its lung box (x0, y0, x1, y1), x1/y1
    exclusive: air outside, an elliptic body (soft tissue) on a table, two lungs whose size varies with t."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    hu = np.full((s, s), -1000.0)
    body = ((xx - s / 2) / (0.42 * s)) ** 2 + ((yy - s / 2) / (0.30 * s)) ** 2 <= 1
    hu[body] = 40.0
    hu[int(0.85 * s):int(0.88 * s), int(0.1 * s):int(0.9 * s)] = 300.0  # the table, apart from the body
    grow = 0.5 + 0.5 * np.sin(np.pi * t)  # lungs largest mid-study
    lung = np.zeros((s, s), bool)
    for cx in (0.32 * s, 0.68 * s):
        lung |= ((xx - cx) / (0.12 * s * grow)) ** 2 + ((yy - 0.48 * s) / (0.2 * s * grow)) ** 2 <= 1
    hu[lung] = -850.0
    hu[int(0.47 * s):int(0.53 * s), int(0.48 * s):int(0.52 * s)] = 250.0  # contrast-filled vessel
    hu += rng.normal(0, 15, (s, s))
    ys, xs = np.nonzero(lung)
    return hu, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def make_dataset(root: Path, n_studies: int = 3, n_slices: int = 8, s: int = 96, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Synthetic studies with files named in shuffled order; returns (meta, true lung box per study)."""
    rng = np.random.default_rng(seed)
    rows, truth = [], {}
    for i in range(n_studies):
        study = f"1.2.826.0.1.3680043.8.498.{seed}.{i + 1}"
        zs = rng.permutation(n_slices).astype(float) * 2.5 - 300.0  # file order != z order
        boxes = []
        for k, z in enumerate(zs):
            sop = f"{study}.{k + 1}"
            hu, box = chest_slice(s, (z + 300.0) / (2.5 * (n_slices - 1)), rng)
            boxes.append(box)
            path = root / study / (study + ".1") / f"{sop}.dcm"
            write_ct(path, hu, z, study, sop)
            rows.append({"StudyInstanceUID": study, "SOPInstanceUID": sop, "path": str(path), "z": z})
        b = np.array(boxes)
        truth[study] = (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())
    meta = pd.DataFrame(rows)
    meta["slice_index"] = meta.groupby("StudyInstanceUID")["z"].rank(method="first").astype(int) - 1
    return meta.sort_values(["StudyInstanceUID", "slice_index"]).reset_index(drop=True), truth


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, dict, Path]:
    root = tmp_path_factory.mktemp("dicoms")
    meta, truth = make_dataset(root)
    meta_path = root / "meta.parquet"
    meta.to_parquet(meta_path)
    return meta, truth, meta_path


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.jpg"))}


# --------------------------------------------------------------------------- JPEG
def test_jpeg_444_roundtrip_error_is_small_and_420_is_not() -> None:
    rgb = window_rgb(read_hu(DATA / "693_UNCR.dcm"))  # a real 512² CT slice
    e444 = np.abs(pc.jpeg_roundtrip(rgb, 95).astype(int) - rgb)
    e420 = np.abs(pc.jpeg_roundtrip(rgb, 95, sampling_444=False).astype(int) - rgb)
    max444, max420 = e444.max(axis=(0, 1)), e420.max(axis=(0, 1))
    mean444, mean420 = e444.mean(axis=(0, 1)), e420.mean(axis=(0, 1))
    print(f"q95 round-trip error per channel (R, G, B): 4:4:4 max {max444.tolist()} mean {mean444.round(2).tolist()}; "
          f"4:2:0 max {max420.tolist()} mean {mean420.round(2).tolist()}")
    # Measured on this slice: 4:4:4 max [23, 14, 24], mean <= 0.7 grey levels, 99.9 % of values within
    # 11 (the large errors sit on the sharpest edges); 4:2:0 max [79, 34, 67], means about twice as large.
    assert max444.max() <= 30 and mean444.max() <= 1.0 and np.percentile(e444, 99.9) <= 12
    assert (max420 >= 2 * max444).all() and (mean420 > mean444).all()  # why 4:4:4: 4:2:0 bleeds windows


def test_decode_returns_rgb_order() -> None:
    img = np.zeros((16, 16, 3), np.uint8)
    img[..., 0] = 200  # pure red: the lung channel
    back = pc.decode_jpeg(pc.encode_jpeg(img))
    assert back[..., 0].min() >= 195 and back[..., 1:].max() <= 5


# --------------------------------------------------------------------------- layout, index, z order
def test_cache_layout_index_and_z_order(dataset, tmp_path: Path) -> None:
    meta, _, meta_path = dataset
    out = tmp_path / "cache"
    summary = pc.cache_images(meta_path, out, size=64, workers=1)
    assert summary["studies_done"] == 3 and summary["slices_written"] == len(meta)
    index = pc.load_index(out)
    assert list(index.columns) == pc.INDEX_COLUMNS
    assert len(index) == len(meta) and not index["replaced"].any()
    merged = meta.merge(index, on=["StudyInstanceUID", "SOPInstanceUID"], suffixes=("", "_idx"))
    assert (merged["slice_index"] == merged["slice_index_idx"]).all()
    assert (merged["file"] == merged["StudyInstanceUID"] + "/" + merged["slice_index"].map("{:04d}.jpg".format)).all()
    # each file is exactly the JPEG of slice_to_rgb of its DICOM (the kernel's function), and that is
    # the float64 definition of the windows, resized
    for r in merged.sample(5, random_state=0).itertuples():
        rgb = pc.slice_to_rgb(r.path, 64)
        assert np.array_equal(rgb, pc.resize_image(window_rgb_reference(read_hu(r.path)), 64))
        assert (out / r.file).read_bytes() == pc.encode_jpeg(rgb)
    # z order: the stacked study follows ascending z
    study = meta["StudyInstanceUID"].iloc[0]
    vol = pc.load_study_images(out, study)
    vol2 = pc.load_study_images(out, study, index=index)
    assert vol.shape == (8, 64, 64, 3) and np.array_equal(vol, vol2)
    ms = meta[meta["StudyInstanceUID"] == study].sort_values("z")
    for k, p in enumerate(ms["path"]):
        assert np.array_equal(vol[k], pc.jpeg_roundtrip(pc.slice_to_rgb(p, 64)))
    boxes = pc.load_boxes(out)
    assert list(boxes.columns) == pc.BOX_COLUMNS and len(boxes) == 3 and (boxes["size"] == 64).all()
    errors = pd.read_csv(out / "errors.csv")
    assert list(errors.columns) == pc.ERROR_COLUMNS and errors.empty


def test_boxes_contain_the_lungs_and_are_tight(dataset, tmp_path: Path) -> None:
    meta, truth, meta_path = dataset
    out = tmp_path / "cache"
    size = 64
    pc.cache_images(meta_path, out, size=size, workers=1, progress=False)
    boxes = pc.load_boxes(out).set_index("StudyInstanceUID")
    s = 96  # original size of the synthetic slices
    for study, (tx0, ty0, tx1, ty1) in truth.items():
        b = boxes.loc[study]
        t = np.array([tx0, ty0, tx1, ty1]) * size / s  # true lung extent in cached pixels
        assert b.x0 <= t[0] and b.y0 <= t[1] and b.x1 >= t[2] and b.y1 >= t[3], (b.to_dict(), t)
        # not much larger: at most margin (5 %) + a grid pixel on each side
        slack = 0.05 * size + 2
        assert t[0] - b.x0 <= slack and t[1] - b.y0 <= slack and b.x1 - t[2] <= slack and b.y1 - t[3] <= slack
        # and it leaves out the table and most of the outside air
        assert (b.x1 - b.x0) * (b.y1 - b.y0) < 0.6 * size * size


def test_box_from_stored_pixels_equals_box_from_hu(dataset) -> None:
    """The cache feeds stored pixels, the Kaggle kernel feeds read_hu: same box."""
    from pe.anatomy.lungbox import LungAccumulator
    from pe.data.dicom import read_dataset, read_pixels, rescale

    meta, _, _ = dataset
    a, b = LungAccumulator(96, 96), LungAccumulator(96, 96)
    for p in meta["path"]:
        ds = read_dataset(p)
        a.add_pixels(read_pixels(ds, p), *rescale(ds))
        b.add(read_hu(p))
    assert a.counts.sum() > 0 and np.array_equal(a.counts, b.counts) and a.box(64) == b.box(64)


# --------------------------------------------------------------------------- resume, shards, force
def test_interrupted_run_resumes_to_identical_files(dataset, tmp_path: Path, monkeypatch) -> None:
    _, _, meta_path = dataset
    ref = tmp_path / "ref"
    pc.cache_images(meta_path, ref, size=64, workers=1, progress=False)

    out = tmp_path / "out"
    calls = {"n": 0}
    real = pc.write_bytes_atomic

    def dying_write(path, data):  # the process "dies" in the middle of the second study
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(pc, "write_bytes_atomic", dying_write)
    with pytest.raises(KeyboardInterrupt):
        pc.cache_images(meta_path, out, size=64, workers=1, progress=False)
    assert len(list((out / pc.PARTS).glob("*.parquet"))) == 1  # one study complete, one half written
    monkeypatch.setattr(pc, "write_bytes_atomic", real)
    summary = pc.cache_images(meta_path, out, size=64, workers=1, progress=False)
    assert summary["studies_already_complete"] == 1 and summary["studies_done"] == 2
    assert _tree(out) == _tree(ref)
    pd.testing.assert_frame_equal(pc.load_index(out), pc.load_index(ref))
    pd.testing.assert_frame_equal(pc.load_boxes(out), pc.load_boxes(ref))
    pd.testing.assert_frame_equal(pc.load_rois(out), pc.load_rois(ref))
    assert not list(out.rglob("*.tmp"))
    again = pc.cache_images(meta_path, out, size=64, workers=1, progress=False)
    assert again["studies_already_complete"] == 3 and again["studies_done"] == 0


def test_rois_are_written_inside_the_image_and_hold_the_lungs(dataset, tmp_path: Path) -> None:
    meta, truth, meta_path = dataset
    out, size = tmp_path / "cache", 64
    pc.cache_images(meta_path, out, size=size, workers=1, progress=False)
    rois = pc.load_rois(out)
    assert list(rois.columns) == ROI_COLUMNS and len(rois) == len(meta)
    keys = ["StudyInstanceUID", "slice_index"]
    pd.testing.assert_frame_equal(rois[keys].reset_index(drop=True), pc.load_index(out)[keys])
    assert (rois["size"] == size).all() and rois["found"].all()  # lungs on every synthetic slice
    assert ((rois.x0 >= 0) & (rois.y0 >= 0) & (rois.x1 <= size) & (rois.y1 <= size)).all()
    assert ((rois.x1 - rois.x0 >= 8) & (rois.y1 - rois.y0 >= 8)).all()
    for study, g in rois.groupby("StudyInstanceUID"):
        t = np.array(truth[study]) * size / 96  # union of the true lungs, cached pixels
        assert g.x0.min() <= t[0] and g.y0.min() <= t[1] and g.x1.max() >= t[2] and g.y1.max() >= t[3]
        area = ((g.x1 - g.x0) * (g.y1 - g.y0)).mean()
        assert area < 0.6 * size * size  # the table and the outside air are cropped away


def test_rois_are_added_to_a_cache_without_them(dataset, tmp_path: Path) -> None:
    """Resumable like the images: a cache made with roi=False (or before ROIs existed) gets only its
    ROIs on the next run, the JPEGs untouched; ROI parts lost in a crash are recomputed the same."""
    _, _, meta_path = dataset
    ref = tmp_path / "ref"
    pc.cache_images(meta_path, ref, size=64, workers=1, progress=False)
    out = tmp_path / "out"
    pc.cache_images(meta_path, out, size=64, workers=1, progress=False, roi=False)
    assert pc.load_rois(out).empty
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    summary = pc.cache_images(meta_path, out, size=64, workers=1, progress=False)
    assert summary["studies_roi_only"] == 3 and summary["studies_done"] == 0 and summary["slices_written"] == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")} == mtimes
    pd.testing.assert_frame_equal(pc.load_rois(out), pc.load_rois(ref))
    first = sorted((out / "_rois").glob("*.parquet"))[0]
    first.unlink()
    again = pc.cache_images(meta_path, out, size=64, workers=1, progress=False)
    assert again["studies_roi_only"] == 1 and again["studies_already_complete"] == 2
    pd.testing.assert_frame_equal(pc.load_rois(out), pc.load_rois(ref))
    (out / "rois.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"rois\.parquet"):
        pc.load_rois(out)
    pd.DataFrame({"StudyInstanceUID": ["1"]}).to_parquet(out / "rois.parquet")
    with pytest.raises(ValueError, match=r"rois\.parquet: missing column"):
        pc.load_rois(out)


def test_script_no_roi_flag(dataset, tmp_path: Path) -> None:
    _, _, meta_path = dataset
    spec = importlib.util.spec_from_file_location("cache_script_roi", REPO / "src" / "02_cache_images.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "cache"
    assert mod.main(["--meta", str(meta_path), "--out", str(out), "--size", "32", "--workers", "1"]) == 0
    assert len(pc.load_rois(out)) == len(pc.load_index(out))
    # --force --no-roi redoes the images and drops the ROI parts of the earlier run (they could be stale)
    assert mod.main(["--meta", str(meta_path), "--out", str(out), "--size", "32", "--workers", "1", "--no-roi",
                     "--force"]) == 0
    assert pc.load_rois(out).empty and not list((out / "_rois").glob("*.parquet"))


def _descendants(pid: int) -> list[int]:
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_killed_subprocess_resumes_to_identical_files(dataset, tmp_path: Path) -> None:
    """A real SIGKILL of the script with 2 workers mid-run, then a re-run: same files as uninterrupted."""
    import signal
    import subprocess
    import sys
    import time

    meta, _, _ = dataset
    big = pd.concat([meta.assign(StudyInstanceUID=meta["StudyInstanceUID"] + f".{r}") for r in range(4)])
    big_path = tmp_path / "big.parquet"
    big.to_parquet(big_path)
    ref = tmp_path / "ref"
    pc.cache_images(big_path, ref, size=64, workers=1, progress=False)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "src" / "02_cache_images.py"), "--meta", str(big_path), "--out", str(out),
           "--size", "64", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / pc.PARTS).glob("*.parquet"))) < 2:
        time.sleep(0.02)
    children = _descendants(proc.pid)
    assert len(children) >= 3  # the forkserver and two workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_parts = len(list((out / pc.PARTS).glob("*.parquet")))
    print(f"killed with {n_parts} of 12 studies complete")
    assert proc.returncode == -signal.SIGKILL and 2 <= n_parts < 12
    assert not (out / "index.parquet").exists()  # the merge at the end never ran
    deadline = time.time() + 10
    while time.time() < deadline and (alive := [p for p in children if _alive(p)]):
        time.sleep(0.1)
    assert not alive, f"processes of the killed run still alive: {alive}"
    n_parts = len(list((out / pc.PARTS).glob("*.parquet")))  # workers may finish a study while dying
    summary = pc.cache_images(big_path, out, size=64, workers=1, progress=False)  # the re-run
    assert summary["studies_already_complete"] == n_parts and summary["studies_done"] == 12 - n_parts
    assert _tree(out) == _tree(ref)
    pd.testing.assert_frame_equal(pc.load_index(out), pc.load_index(ref))
    pd.testing.assert_frame_equal(pc.load_boxes(out), pc.load_boxes(ref))
    pd.testing.assert_frame_equal(pc.load_rois(out), pc.load_rois(ref))


def test_shards_partition_and_accumulate(dataset, tmp_path: Path) -> None:
    meta, _, meta_path = dataset
    out = tmp_path / "cache"
    done = [pc.cache_images(meta_path, out, size=32, shard=(i, 2), progress=False)["studies_done"] for i in range(2)]
    assert sum(done) == 3
    assert len(pc.load_index(out)) == len(meta) and len(pc.load_boxes(out)) == 3
    with pytest.raises(ValueError, match="i/n"):
        pc.parse_shard("2")
    with pytest.raises(ValueError, match="0 <= i < n"):
        pc.parse_shard("2/2")
    assert pc.parse_shard("1/4") == (1, 4)


def test_force_redoes_and_script_main(dataset, tmp_path: Path) -> None:
    _, _, meta_path = dataset
    spec = importlib.util.spec_from_file_location("cache_script", REPO / "src" / "02_cache_images.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "cache"
    assert mod.main(["--meta", str(meta_path), "--out", str(out), "--size", "32", "--workers", "1"]) == 0
    before = _tree(out)
    summary = pc.cache_images(meta_path, out, size=32, force=True, progress=False)
    assert summary["studies_done"] == 3 and _tree(out) == before


# --------------------------------------------------------------------------- bad input
def test_corrupt_slices_are_logged_and_replaced(dataset, tmp_path: Path) -> None:
    meta, _, _ = dataset
    meta = meta.copy()
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    studies = meta["StudyInstanceUID"].unique()
    # study 0: slice 3 truncated; study 1: every slice garbage
    s0 = meta[(meta["StudyInstanceUID"] == studies[0]) & (meta["slice_index"] == 3)].index[0]
    trunc = bad_dir / "truncated.dcm"
    trunc.write_bytes(Path(meta.at[s0, "path"]).read_bytes()[:5000])
    meta.at[s0, "path"] = str(trunc)
    for i in meta.index[meta["StudyInstanceUID"] == studies[1]]:
        p = bad_dir / f"garbage{i}.dcm"
        p.write_bytes(b"not a dicom at all" * 10)
        meta.at[i, "path"] = str(p)
    out = tmp_path / "cache"
    summary = pc.cache_images(meta, out, size=32, workers=1, progress=False)
    assert summary["studies_done"] == 2 and summary["studies_failed"] == 1
    assert summary["failed_studies"] == [studies[1]] and summary["slices_replaced"] == 1
    errors = pd.read_csv(out / "errors.csv")
    assert len(errors) == 1 + 8
    row = errors[errors["file"] == str(trunc)].iloc[0]
    assert row["StudyInstanceUID"] == studies[0] and "truncated.dcm" in row["reason"]
    index = pc.load_index(out)
    assert studies[1] not in set(index["StudyInstanceUID"])
    s0_idx = index[index["StudyInstanceUID"] == studies[0]].set_index("slice_index")
    assert s0_idx["replaced"].tolist() == [k == 3 for k in range(8)]
    # the nearest decodable neighbour (the earlier one on a tie) stands in for the bad slice
    assert (out / s0_idx.at[3, "file"]).read_bytes() == (out / s0_idx.at[2, "file"]).read_bytes()


def test_meta_without_required_columns_is_rejected(tmp_path: Path) -> None:
    p = tmp_path / "m.parquet"
    pd.DataFrame({"StudyInstanceUID": ["1"], "path": ["x"]}).to_parquet(p)
    with pytest.raises(ValueError, match=r"m\.parquet.*SOPInstanceUID"):
        pc.cache_images(p, tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        pc.cache_images(tmp_path / "nope.parquet", tmp_path / "c")


# --------------------------------------------------------------------------- the shared phantom
def test_phantom_cache_covers_every_slice_and_matches_the_meta(phantom_meta, phantom_cache) -> None:
    meta = pd.concat([pd.read_parquet(phantom_meta[s]) for s in ("train", "test")], ignore_index=True)
    index = pc.load_index(phantom_cache)
    assert len(index) == len(meta) and index["SOPInstanceUID"].is_unique
    m = meta.merge(index, on=["StudyInstanceUID", "SOPInstanceUID"], suffixes=("", "_c"), validate="1:1")
    assert (m["slice_index"] == m["slice_index_c"]).all()
    assert not m["replaced"].any()  # the phantom's files all decode, whatever their syntax
    for syntax, g in m.groupby("transfer_syntax"):  # one slice per syntax: file == JPEG of slice_to_rgb
        r = g.iloc[len(g) // 2]
        assert (phantom_cache / r["file"]).read_bytes() == pc.encode_jpeg(pc.slice_to_rgb(r["path"], 128)), syntax
    study = m["StudyInstanceUID"].iloc[0]
    vol = pc.load_study_images(phantom_cache, study)
    assert vol.shape == ((m["StudyInstanceUID"] == study).sum(), 128, 128, 3)


def test_phantom_boxes_contain_the_true_lungs(phantom_dir, phantom_cache) -> None:
    truth = pd.read_csv(phantom_dir / "phantom_truth.csv", dtype={"StudyInstanceUID": str})
    boxes = pc.load_boxes(phantom_cache).set_index("StudyInstanceUID")
    assert set(boxes.index) == set(truth["StudyInstanceUID"])
    for t in truth[truth["lung_x1"] > 0].itertuples():
        b = boxes.loc[t.StudyInstanceUID]
        scale = b["size"] / t.size
        tx0, ty0, tx1, ty1 = (v * scale for v in (t.lung_x0, t.lung_y0, t.lung_x1, t.lung_y1))
        assert b.x0 <= tx0 and b.y0 <= ty0 and b.x1 >= tx1 and b.y1 >= ty1, (t.StudyInstanceUID, b.to_dict(), (tx0, ty0, tx1, ty1))
        slack = 0.05 * b["size"] + 0.03 * b["size"]  # the margin plus a little
        assert tx0 - b.x0 <= slack and ty0 - b.y0 <= slack and b.x1 - tx1 <= slack and b.y1 - ty1 <= slack, (
            t.StudyInstanceUID, b.to_dict(), (tx0, ty0, tx1, ty1))
