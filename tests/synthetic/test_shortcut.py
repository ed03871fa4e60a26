"""The phantom's shortcut option: a chest-wall feature on PE-positive TRAIN slices only, and a phantom
byte-identical to today's when it is off."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import config as dicom_config

from pe.synthetic import phantom

SMALL = dict(train_studies=8, test_studies=2, seed=11, size=64, min_slices=10, max_slices=14, positive_rate=0.5,
             compress=False)


def _digest(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def _hu(path: Path) -> np.ndarray:
    with dicom_config.disable_value_validation():
        ds = pydicom.dcmread(path)
        return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("shortcut")
    out = {"none": base / "none", "zero": base / "zero", "one": base / "one"}
    phantom.make_phantom(out["none"], **SMALL)
    phantom.make_phantom(out["zero"], **SMALL, shortcut_rate=0.0)
    phantom.make_phantom(out["one"], **SMALL, shortcut_rate=1.0)
    return out


def test_rate_zero_is_byte_identical(phantoms: dict[str, Path]) -> None:
    assert _digest(phantoms["zero"]) == _digest(phantoms["none"])
    assert not (phantoms["zero"] / phantom.SHORTCUT_FILE).exists()


def test_rate_one_marks_every_positive_train_slice_and_no_test_slice(phantoms: dict[str, Path]) -> None:
    one, none = phantoms["one"], phantoms["none"]
    marks = pd.read_csv(one / phantom.SHORTCUT_FILE, dtype={"SOPInstanceUID": str}).set_index("SOPInstanceUID")
    train = pd.read_csv(one / "train.csv", dtype={"SOPInstanceUID": str})
    positives = set(train.loc[train["pe_present_on_image"] == 1, "SOPInstanceUID"])
    assert len(positives) >= 5 and set(marks.index) == positives
    boxes = pd.read_csv(one / "train_boxes.csv", dtype={"SOPInstanceUID": str})
    new, old = _digest(one), _digest(none)
    for rel, h in old.items():
        if not rel.endswith(".dcm"):
            continue
        sop = Path(rel).stem
        if sop not in positives:  # test split and negative train slices: untouched bytes
            assert new[rel] == h, rel
            continue
        diff = _hu(one / rel) - _hu(none / rel)
        x, y, r = marks.loc[sop, ["x", "y", "radius"]]
        ys, xs = np.nonzero(diff)
        # Only the marker disc changed, and it is bright: a shortcut, in the chest wall.
        assert np.hypot(xs - x, ys - y).max() <= r + 1.5 and diff[y, x] > 1000, rel
        assert -200 < _hu(none / rel)[y, x] < 150  # fat / muscle of the body wall, not lung or air
        for bx, by, bw, bh in boxes.loc[boxes["SOPInstanceUID"] == sop, ["x", "y", "width", "height"]].to_numpy():
            assert not (bx - r <= x <= bx + bw + r and by - r <= y <= by + bh + r)  # far from every embolus
    test = pd.read_csv(one / "test.csv", dtype={"SOPInstanceUID": str})
    assert not set(test["SOPInstanceUID"]) & set(marks.index)


def test_partial_rate_and_bad_options(tmp_path: Path) -> None:
    phantom.make_phantom(tmp_path / "half", **SMALL, shortcut_rate=0.5, shortcut_kind="stripes")
    marks = pd.read_csv(tmp_path / "half" / phantom.SHORTCUT_FILE, dtype={"SOPInstanceUID": str})
    train = pd.read_csv(tmp_path / "half" / "train.csv", dtype={"SOPInstanceUID": str})
    positives = set(train.loc[train["pe_present_on_image"] == 1, "SOPInstanceUID"])
    assert set(marks["SOPInstanceUID"]) < positives
    assert 0.2 < len(marks) / len(positives) < 0.8
    with pytest.raises(ValueError, match="shortcut_rate"):
        phantom.make_phantom(tmp_path / "bad", **SMALL, shortcut_rate=1.5)


def test_cli_flag(tmp_path: Path, phantoms: dict[str, Path], load_script: Callable[[str], ModuleType]) -> None:
    args = ["--out", str(tmp_path / "cli"), "--train-studies", "8", "--test-studies", "2", "--seed", "11",
            "--size", "64", "--min-slices", "10", "--max-slices", "14", "--positive-rate", "0.5", "--workers", "1",
            "--shortcut-rate", "1"]
    assert load_script("00_make_phantom.py").main(args) == 0
    a = pd.read_csv(tmp_path / "cli" / phantom.SHORTCUT_FILE)
    b = pd.read_csv(phantoms["one"] / phantom.SHORTCUT_FILE)
    assert a.equals(b)
