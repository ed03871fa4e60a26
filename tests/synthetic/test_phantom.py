"""The phantom re-read from disk against every RSPECT rule (RSPECT.md): layout, columns, row layout of
the sample submission, label hierarchy, DICOM realism, z order in both directions, lossless
compression, determinism, and a visual cause for the labels."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import config as dicom_config

from pe import rspect
from pe.ids import exam_row_id
from pe.synthetic import phantom
from pe.synthetic.phantom_scale import FRAC_MAX

TINY = dict(train_studies=4, test_studies=1, seed=7, size=48, min_slices=6, max_slices=9)


@pytest.fixture(autouse=True)
def _hex_ids_read_quietly():
    """Header values are converted lazily, so validation stays off for the whole test: the 12-hex
    RSPECT ids are not DICOM UIDs and pydicom would warn on every one."""
    with dicom_config.disable_value_validation():
        yield


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _read(path: Path, **kw) -> pydicom.Dataset:
    return pydicom.dcmread(path, **kw)


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _check_hierarchy(labels: pd.DataFrame) -> None:
    """The RSPECT rules of rspect.RULES, applied to the ground truth (one study at a time)."""
    for study, g in labels.groupby("StudyInstanceUID"):
        exam = g[list(rspect.EXAM_LABELS + rspect.INFO_LABELS)]
        assert (exam.nunique() == 1).all(), f"{study}: exam labels differ between rows"
        e = exam.iloc[0]
        assert set(g[rspect.IMAGE_LABEL].unique()) <= {0, 1}
        if g[rspect.IMAGE_LABEL].max() > rspect.THRESHOLD:  # positive exam
            assert sum(e[c] for c in rspect.RV_LV_LABELS) == 1, (study, "1a")
            assert sum(e[c] for c in rspect.LOCATION_LABELS) >= 1, (study, "1b")
            assert sum(e[c] for c in rspect.CHRONICITY_LABELS) <= 1, (study, "1c")
            assert all(e[c] == 0 for c in rspect.NEGATIVE_LABELS), (study, "1d")
        else:
            assert sum(e[c] for c in rspect.NEGATIVE_LABELS) == 1, (study, "2a")
            assert all(e[c] == 0 for c in rspect.POSITIVE_ONLY_LABELS), (study, "2b")


def test_layout_columns_and_submission(phantom_dir: Path) -> None:
    train = pd.read_csv(phantom_dir / "train.csv", dtype=str)
    test = pd.read_csv(phantom_dir / "test.csv", dtype=str)
    assert tuple(train.columns) == rspect.TRAIN_COLUMNS
    assert tuple(test.columns) == rspect.TEST_COLUMNS
    for split, df in (("train", train), ("test", test)):
        want = {phantom_dir / split / r.StudyInstanceUID / r.SeriesInstanceUID / f"{r.SOPInstanceUID}.dcm"
                for r in df.itertuples()}
        assert set(_files(phantom_dir / split)) == want, f"{split}: files and {split}.csv differ"
        assert df["SOPInstanceUID"].is_unique
        for col in rspect.ID_COLUMNS:  # 12-hex ids, like the anonymised RSPECT ids
            assert df[col].str.fullmatch(r"[0-9a-f]{12}").all()
            assert df[col].map(rspect.is_valid_uid).all()
        assert (df.groupby("StudyInstanceUID")["SeriesInstanceUID"].nunique() == 1).all()
    assert train["StudyInstanceUID"].nunique() == 10 and test["StudyInstanceUID"].nunique() == 3
    sub = pd.read_csv(phantom_dir / "sample_submission.csv")
    assert tuple(sub.columns) == rspect.SUBMISSION_COLUMNS
    studies = test["StudyInstanceUID"].unique()
    assert len(sub) == len(test) + 9 * len(studies)
    want_ids = set(test["SOPInstanceUID"]) | {exam_row_id(s, lab) for s in studies for lab in rspect.EXAM_LABELS}
    assert set(sub["id"]) == want_ids and sub["id"].is_unique
    assert (sub["label"] == 0.5).all()


def test_labels_obey_hierarchy_and_truth(phantom_dir: Path) -> None:
    train = pd.read_csv(phantom_dir / "train.csv")
    test_labels = pd.read_csv(phantom_dir / phantom.TEST_LABELS_FILE)
    assert tuple(test_labels.columns) == rspect.TRAIN_COLUMNS
    test = pd.read_csv(phantom_dir / "test.csv")
    assert test_labels[list(rspect.TEST_COLUMNS)].equals(test)
    truth = pd.read_csv(phantom_dir / phantom.TRUTH_FILE).set_index("StudyInstanceUID")
    for labels in (train, test_labels):
        _check_hierarchy(labels)
        exam = labels.groupby("StudyInstanceUID").first()
        for col in rspect.EXAM_LABELS + rspect.INFO_LABELS:
            assert (exam[col] == truth.loc[exam.index, col]).all(), col
        npos = labels.groupby("StudyInstanceUID")[rspect.IMAGE_LABEL].sum()
        assert (npos == truth.loc[npos.index, "n_positive_images"]).all()
    # rv/lv label and the drawn ratio agree (the label has a visual cause).
    pos = truth[truth["exam_kind"] == "positive"]
    assert ((pos["rv_lv_ratio"] >= 1) == (pos["rv_lv_ratio_gte_1"] == 1)).all()
    assert train.groupby("StudyInstanceUID")[rspect.IMAGE_LABEL].max().sum() == 3  # 32 % of 10


def test_boxes_match_positive_images(phantom_dir: Path) -> None:
    train = pd.read_csv(phantom_dir / "train.csv", dtype={"SOPInstanceUID": str})
    boxes = pd.read_csv(phantom_dir / "train_boxes.csv", dtype={"SOPInstanceUID": str})
    assert tuple(boxes.columns) == phantom.BOX_COLUMNS
    positive = set(train.loc[train[rspect.IMAGE_LABEL] == 1, "SOPInstanceUID"])
    assert set(boxes["SOPInstanceUID"]) == positive
    assert (boxes[["x", "y"]] >= 0).all().all() and (boxes[["width", "height"]] > 0).all().all()
    assert ((boxes["x"] + boxes["width"]) <= 128).all() and ((boxes["y"] + boxes["height"]) <= 128).all()


def test_truth_lung_boxes(phantom_dir: Path) -> None:
    truth = pd.read_csv(phantom_dir / phantom.TRUTH_FILE)
    assert set(truth["split"]) == {"train", "test"} and len(truth) == 13
    assert ((truth["lung_x0"] >= 0) & (truth["lung_x1"] <= truth["size"])).all()
    assert ((truth["lung_x1"] - truth["lung_x0"]) > 0.4 * truth["size"]).all()  # two lungs side by side
    assert ((truth["lung_y1"] - truth["lung_y0"]) > 0.2 * truth["size"]).all()
    # The middle slice of a study is mostly lung (< -600 HU) inside its box, hardly any outside it
    # within the body.
    row = truth[truth["split"] == "train"].iloc[0]
    train = pd.read_csv(phantom_dir / "train.csv", dtype=str)
    files = [phantom_dir / "train" / r.StudyInstanceUID / r.SeriesInstanceUID / f"{r.SOPInstanceUID}.dcm"
             for r in train[train["StudyInstanceUID"] == row["StudyInstanceUID"]].itertuples()]
    slices = sorted((float(_read(f).ImagePositionPatient[2]), f) for f in files)
    hu = _hu(_read(slices[len(slices) // 2][1]))
    box = np.zeros(hu.shape, bool)
    box[row["lung_y0"]:row["lung_y1"], row["lung_x0"]:row["lung_x1"]] = True
    assert (hu[box] < -600).mean() > 0.3


def test_dicom_realism(phantom_dir: Path) -> None:
    seen: dict[str, set] = {k: set() for k in ("syntax", "rep", "intercept", "bits", "window", "order")}
    truth = pd.read_csv(phantom_dir / phantom.TRUTH_FILE).set_index("StudyInstanceUID")
    for series in sorted((phantom_dir / "train").glob("*/*")) + sorted((phantom_dir / "test").glob("*/*")):
        heads = []
        for f in sorted(series.glob("*.dcm")):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # hex ids must read cleanly with validation off
                ds = _read(f, stop_before_pixels=True)
            assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
            assert ds.SOPClassUID == pydicom.uid.CTImageStorage
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == f.stem
            assert ds.Modality == "CT" and ds.PhotometricInterpretation == "MONOCHROME2"
            assert ds.Rows == ds.Columns == 128 and float(ds.RescaleSlope) == 1.0
            assert len(ds.PixelSpacing) == 2 and float(ds.SliceThickness) > 0
            seen["syntax"].add(str(ds.file_meta.TransferSyntaxUID))
            seen["rep"].add(int(ds.PixelRepresentation))
            seen["intercept"].add(float(ds.RescaleIntercept))
            seen["bits"].add(int(ds.BitsStored))
            seen["window"].add(isinstance(ds.WindowCenter, pydicom.multival.MultiValue))
            heads.append((float(ds.ImagePositionPatient[2]), int(ds.InstanceNumber)))
        z, inst = np.array(heads).T
        assert len(set(z)) == len(z)
        by_inst = z[np.argsort(inst)]
        order = ("ascending" if (np.diff(by_inst) > 0).all() else "descending" if (np.diff(by_inst) < 0).all()
                 else "mixed")
        seen["order"].add(order)
        want = {"z_ascending": "ascending", "z_descending": "descending"}.get(
            truth.loc[series.parent.name, "instance_order"], "mixed")
        assert order == want
    assert {pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless, phantom.JPEG_LOSSLESS,
            pydicom.uid.ExplicitVRLittleEndian} <= seen["syntax"]
    assert seen["rep"] == {0, 1} and seen["intercept"] == {0.0, -1024.0} and seen["bits"] == {12, 16}
    assert seen["window"] == {True, False} and seen["order"] == {"ascending", "descending", "mixed"}


def test_compressed_files_decode_to_the_same_hu(tmp_path: Path) -> None:
    packed, plain = tmp_path / "packed", tmp_path / "plain"
    phantom.make_phantom(packed, **TINY)
    phantom.make_phantom(plain, **TINY, compress=False)
    syntaxes = set()
    for f in _files(packed / "train") + _files(packed / "test"):
        ds = _read(f)
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
        twin = _read(plain / f.relative_to(packed))
        assert twin.file_meta.TransferSyntaxUID in (pydicom.uid.ExplicitVRLittleEndian,
                                                    pydicom.uid.ImplicitVRLittleEndian)
        assert ds.SOPInstanceUID == twin.SOPInstanceUID == f.stem  # compress() kept the SOP id
        np.testing.assert_array_equal(_hu(ds), _hu(twin), err_msg=str(f))
    assert {pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless, phantom.JPEG_LOSSLESS} <= syntaxes


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in _files(root):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    phantom.make_phantom(tmp_path / "a", **TINY)
    phantom.make_phantom(tmp_path / "b", **TINY, workers=2)  # worker count must not matter
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    phantom.make_phantom(tmp_path / "a", **{**TINY, "seed": 8})  # regenerating in place is allowed
    assert _digest(tmp_path / "a") != _digest(tmp_path / "b")


def test_refuses_to_overwrite_other_data(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "precious.dcm").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a phantom"):
        phantom.make_phantom(tmp_path, **TINY)
    assert (tmp_path / "train" / "precious.dcm").exists()
    # A phantom whose run was cut short (marker written, no truth file yet) is replaced.
    cut = tmp_path / "cut"
    (cut / "train" / "half").mkdir(parents=True)
    (cut / phantom.MARKER_FILE).write_text("{}")
    phantom.make_phantom(cut, **TINY)
    assert not (cut / "train" / "half").exists() and (cut / phantom.TRUTH_FILE).exists()


def test_dicom_uid_style(tmp_path: Path) -> None:
    phantom.make_phantom(tmp_path, **{**TINY, "train_studies": 2, "test_studies": 1}, uid_style="dicom")
    train = pd.read_csv(tmp_path / "train.csv", dtype=str)
    for col in rspect.ID_COLUMNS:
        assert train[col].str.startswith("2.25.").all() and train[col].map(rspect.is_valid_uid).all()
        assert (train[col].str.len() <= 64).all()
    f = _files(tmp_path / "train")[0]
    mode = dicom_config.settings.reading_validation_mode
    dicom_config.settings.reading_validation_mode = dicom_config.RAISE
    try:  # valid UIDs: pydicom's own strictest validation accepts them
        ds = pydicom.dcmread(f)
        assert ds.SOPInstanceUID == f.stem and ds.StudyInstanceUID == f.parent.parent.name
    finally:
        dicom_config.settings.reading_validation_mode = mode
    with pytest.raises(ValueError, match="uid_style"):
        phantom.make_phantom(tmp_path / "x", **TINY, uid_style="nope")


def test_prevalences_by_quota() -> None:
    """Planning only (no drawing): RSPECT-like prevalences even on the demo's 40 studies."""
    plans = phantom.plan_split("train", 40, 0, 512, 40, 100)
    kinds = pd.Series([p.exam_kind for p in plans]).value_counts()
    assert kinds["positive"] == 13 and kinds["indeterminate"] == 1
    big = phantom.plan_split("train", 250, 1, 512, 40, 100)
    lab = pd.DataFrame([p.labels for p in big])
    pos = lab[lab["negative_exam_for_pe"] + lab["indeterminate"] == 0]
    assert len(pos) == 80 and lab["indeterminate"].sum() == 5
    for col, p in (("rv_lv_ratio_gte_1", 0.40), ("rightsided_pe", 0.80), ("leftsided_pe", 0.65),
                   ("central_pe", 0.17), ("chronic_pe", 0.12), ("acute_and_chronic_pe", 0.06)):
        assert abs(pos[col].mean() - p) < 0.06, col
    share = [len(p.positive_slices()) / p.n for p in big if p.exam_kind == "positive"]
    assert 0.08 < np.mean(share) < 0.25 and min(share) > 0  # RSPECT: ~5 % of slices overall, 5-30 % per positive
    # Indeterminate exams have a visual cause: poor pulmonary-artery contrast or motion.
    for p in big:
        if p.exam_kind == "indeterminate":
            assert p.motion or p.contrast["pa"] < 150
            assert p.labels["qa_motion"] + p.labels["qa_contrast"] == 1


def test_positive_rate_enriches_positive_exams() -> None:
    """--positive-rate (learning tests want more positive slices) sets the positive-exam quota;
    the sub-label shares among positives and the label hierarchy stay as with RSPECT's rate."""
    plans = phantom.plan_split("train", 100, 2, 512, 20, 30, positive_rate=0.7)
    lab = pd.DataFrame([p.labels for p in plans])
    assert sum(p.exam_kind == "positive" for p in plans) == 70
    assert (lab["negative_exam_for_pe"] + lab["indeterminate"] == 0).sum() == 70
    assert lab["indeterminate"].sum() == 2
    pos = lab[lab["negative_exam_for_pe"] + lab["indeterminate"] == 0]
    assert abs(pos["rightsided_pe"].mean() - 0.80) < 0.06
    assert not any(p.exam_kind == "positive" for p in phantom.plan_split("train", 30, 2, 64, 8, 10, positive_rate=0.0))
    with pytest.raises(ValueError, match="positive_rate"):
        phantom.plan_split("train", 10, 2, 64, 8, 10, positive_rate=1.0)


def test_embolus_scale_shrinks_emboli_and_changes_nothing_else() -> None:
    """--embolus-scale (the benchmark's harder phantom): the same studies, labels and vessels; every
    PE embolus keeps the middle of its run of slices (at least one) and a defect scaled down; the
    study's positive slices shrink accordingly, so the per-image labels stay the truth."""
    ref = phantom.plan_split("train", 30, 4, 256, 20, 40, positive_rate=0.6)
    hard = phantom.plan_split("train", 30, 4, 256, 20, 40, positive_rate=0.6, embolus_scale=0.5)
    assert [p.study for p in ref] == [p.study for p in hard]
    shrunk = 0
    for a, b in zip(ref, hard, strict=True):
        assert a.labels == b.labels and a.n == b.n and len(a.tubes) == len(b.tubes)
        assert len(a.emboli) == len(b.emboli)
        for ea, eb in zip(a.emboli, b.emboli, strict=True):
            if ea.style == "aortic":
                assert eb.slices == ea.slices and eb.frac == ea.frac
                continue
            assert eb.frac == pytest.approx(0.5 * ea.frac)
            assert len(eb.slices) == max(1, round(0.5 * len(ea.slices)))
            assert set(eb.slices) <= set(ea.slices)
            shrunk += len(eb.slices) < len(ea.slices)
        assert b.positive_slices() <= a.positive_slices()
        assert bool(b.positive_slices()) == bool(a.positive_slices())
    assert shrunk >= 5


def test_embolus_scale_above_one_grows_emboli_inside_their_vessel() -> None:
    """--embolus-scale > 1 (an easier phantom): the same studies and labels; every PE embolus keeps its
    slices and grows along its host vessel to round(run x scale) where the vessel allows, and its
    defect radius grows up to FRAC_MAX of the vessel's."""
    ref = phantom.plan_split("train", 30, 4, 256, 20, 40, positive_rate=0.6)
    easy = phantom.plan_split("train", 30, 4, 256, 20, 40, positive_rate=0.6, embolus_scale=1.5)
    grown = capped = 0
    for a, b in zip(ref, easy, strict=True):
        assert a.labels == b.labels and a.n == b.n and len(a.emboli) == len(b.emboli)
        for ea, eb in zip(a.emboli, b.emboli, strict=True):
            if ea.style == "aortic":
                assert eb.slices == ea.slices and eb.frac == ea.frac
                continue
            assert eb.frac == pytest.approx(min(FRAC_MAX, 1.5 * ea.frac))
            capped += eb.frac == FRAC_MAX
            host = [k for k in range(a.n) if a.tubes[ea.tube].t0 <= a.t[k] <= a.tubes[ea.tube].t1]
            assert set(ea.slices) <= set(eb.slices) <= set(host) | set(ea.slices)
            assert eb.slices == sorted(eb.slices) and len(eb.slices) <= max(1, round(1.5 * len(ea.slices)))
            assert len(eb.slices) == min(len(host), round(1.5 * len(ea.slices))) or ea.slices[0] not in host
            grown += len(eb.slices) > len(ea.slices)
        assert b.positive_slices() >= a.positive_slices()
    assert grown >= 5 and capped >= 3
    with pytest.raises(ValueError, match="embolus_scale"):
        phantom.make_phantom("unused", 1, 1, 0, embolus_scale=2.5)


def test_emboli_are_dark_defects_inside_bright_arteries() -> None:
    """Every label's visual cause: removing the emboli changes a slice only inside its boxes, where
    contrast-filled artery (> 200 HU) becomes soft tissue (< 100 HU)."""
    plans = [p for p in phantom.plan_split("train", 12, 3, 256, 30, 40) if p.exam_kind == "positive"]
    assert plans
    checked = 0
    for plan in plans:
        bare = phantom.StudyPlan(**{**plan.__dict__, "emboli": []})
        for k in sorted(plan.positive_slices()):
            img, boxes, _ = phantom.render_slice(plan, k, np.random.default_rng(k))
            ref, none, _ = phantom.render_slice(bare, k, np.random.default_rng(k))
            assert boxes and not none
            inside = np.zeros(img.shape, bool)
            near = np.zeros(img.shape, bool)  # the box plus the 2-px halo of the partial-volume blur
            for x, y, w, h in boxes:
                inside[y:y + h, x:x + w] = True
                near[max(0, y - 2):y + h + 2, max(0, x - 2):x + w + 2] = True
            diff = img - ref
            assert np.abs(diff[~near]).max() < 1e-3
            darker = diff < -100
            assert darker.sum() >= 2
            assert np.median(ref[darker]) > 200 and np.median(img[darker]) < 120
            checked += 1
    assert checked >= 10


def test_rv_enlargement_and_motion_are_visible() -> None:
    plans = phantom.plan_split("train", 40, 0, 256, 20, 24)
    plan = plans[0]
    k = int(np.argmin(np.abs(plan.t - 0.7)))  # heart level
    big = phantom.StudyPlan(**{**plan.__dict__, "heart": {**plan.heart, "ratio": 1.4}})
    small = phantom.StudyPlan(**{**plan.__dict__, "heart": {**plan.heart, "ratio": 0.7}})
    # The RV cavity is as bright as the pulmonary arteries: more such pixels with an enlarged RV.
    thr = 0.8 * plan.contrast["rv"]
    area = [(phantom.render_slice(p, k, np.random.default_rng(0))[0] > thr).sum() for p in (big, small)]
    assert area[0] > 1.3 * area[1]
    quiet = phantom.StudyPlan(**{**plan.__dict__, "noise_sigma": 0.0})
    blurred = phantom.StudyPlan(**{**quiet.__dict__, "motion": True})
    sharp_img = phantom.render_slice(quiet, k, np.random.default_rng(0))[0]
    blur_img = phantom.render_slice(blurred, k, np.random.default_rng(0))[0]
    # Gradient energy (not mean |gradient|, which a blur of a step edge preserves).
    energy = [(np.diff(im, axis=0) ** 2).mean() + (np.diff(im, axis=1) ** 2).mean() for im in (sharp_img, blur_img)]
    assert energy[1] < 0.5 * energy[0]


def test_script_main(tmp_path: Path, load_script) -> None:
    mod = load_script("00_make_phantom.py")
    assert mod.main(["--out", str(tmp_path), "--train-studies", "2", "--test-studies", "1", "--seed", "1",
                     "--size", "40", "--min-slices", "5", "--max-slices", "6", "--workers", "1"]) == 0
    assert len(pd.read_csv(tmp_path / "train.csv")) >= 10
    assert not (tmp_path / ".scratch").exists()
    rich = tmp_path / "rich"
    assert mod.main(["--out", str(rich), "--train-studies", "4", "--test-studies", "0", "--seed", "1",
                     "--size", "40", "--min-slices", "5", "--max-slices", "6", "--workers", "1",
                     "--positive-rate", "0.75"]) == 0
    truth = pd.read_csv(rich / phantom.TRUTH_FILE)
    assert (truth["exam_kind"] == "positive").sum() == 3


def test_script_preset_gives_the_demo_sizes_and_flags_override_it(tmp_path: Path, load_script) -> None:
    mod = load_script("00_make_phantom.py")
    demo = mod.parse_args(["--out", str(tmp_path), "--preset", "demo", "--seed", "3"])
    assert (demo.train_studies, demo.test_studies, demo.size, demo.min_slices, demo.max_slices,
            demo.positive_rate, demo.seed) == (72, 10, 512, 30, 50, 0.7, 3)
    mixed = mod.parse_args(["--out", str(tmp_path), "--preset", "demo", "--seed", "0", "--train-studies", "120",
                            "--max-slices", "30"])
    assert (mixed.train_studies, mixed.max_slices, mixed.min_slices) == (120, 30, 30)
    plain = mod.parse_args(["--out", str(tmp_path), "--train-studies", "4", "--test-studies", "1", "--seed", "0"])
    assert (plain.size, plain.min_slices, plain.max_slices, plain.positive_rate) == (512, 40, 100, phantom.P_POSITIVE)
    with pytest.raises(SystemExit):  # no counts and no preset
        mod.parse_args(["--out", str(tmp_path), "--seed", "0", "--test-studies", "1"])
    with pytest.raises(SystemExit):
        mod.parse_args(["--out", str(tmp_path), "--preset", "nope", "--seed", "0"])
