"""The single-source modules: RSPECT facts, paths, atomic io, config."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest

from pe import config, io, paths, rspect
from pe.ids import exam_row_id, split_exam_row_id


def test_exam_weights_match_reference_sheet_and_sum_to_one() -> None:
    assert len(rspect.EXAM_LABELS) == 9
    assert set(rspect.EXAM_WEIGHTS) == set(rspect.EXAM_LABELS)
    assert math.isclose(sum(rspect.EXAM_WEIGHTS.values()), 1.0, abs_tol=1e-8)
    # The image weight equals the negative_exam_for_pe weight to the printed precision (12/163).
    assert math.isclose(rspect.IMAGE_WEIGHT, 12 / 163, abs_tol=1e-8)
    assert rspect.EXAM_WEIGHT_VECTOR == tuple(rspect.EXAM_WEIGHTS[k] for k in rspect.EXAM_LABELS)


def test_train_columns_are_ids_image_label_exam_and_info_labels() -> None:
    cols = set(rspect.TRAIN_COLUMNS)
    assert len(rspect.TRAIN_COLUMNS) == 17 == len(cols)
    assert cols == set(rspect.ID_COLUMNS) | {rspect.IMAGE_LABEL} | set(rspect.EXAM_LABELS) | set(rspect.INFO_LABELS)
    assert set(rspect.POSITIVE_ONLY_LABELS) | set(rspect.NEGATIVE_LABELS) == set(rspect.EXAM_LABELS)


@pytest.mark.parametrize(
    "uid, ok",
    [
        ("6897fa9de148", True),  # real RSPECT (Kaggle) style
        ("1.2.840.113619.2.55.3", True),
        ("2.25.329800735698586629295641978511506172918", True),
        ("1.02.3", False),  # leading zero in a component
        ("1..2", False),
        ("../../etc/passwd", False),
        ("6897FA9DE148", False),
        ("abc", False),
        ("1." + "1" * 70, False),  # over 64 characters
        (None, False),
        ("", False),
    ],
)
def test_uid_validation(uid: object, ok: bool) -> None:
    assert rspect.is_valid_uid(uid) is ok


def test_exam_row_ids_round_trip() -> None:
    for label in rspect.EXAM_LABELS:
        rid = exam_row_id("6897fa9de148", label)
        assert split_exam_row_id(rid) == ("6897fa9de148", label)
    assert split_exam_row_id("c0f3cb036d06") is None
    # rv_lv_ratio_lt_1 must not be mistaken for another label's suffix
    assert split_exam_row_id("a_rv_lv_ratio_lt_1") == ("a", "rv_lv_ratio_lt_1")


def test_paths_follow_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PE_DATA_DIR", str(tmp_path / "kaggle"))
    monkeypatch.setenv("PE_WORK_DIR", str(tmp_path / "w"))
    assert paths.data_dir() == tmp_path / "kaggle"
    assert paths.meta_path("train") == tmp_path / "w" / "meta" / "train.parquet"
    assert paths.run_dir("demo", 3) == tmp_path / "w" / "models" / "demo" / "fold3"
    monkeypatch.delenv("PE_DATA_DIR")
    assert paths.data_dir() == paths.REPO_ROOT / "input" / "phantom"
    assert (paths.REPO_ROOT / "src" / "pe" / "paths.py").is_file()


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.csv"
    io.write_csv_atomic(pd.DataFrame({"a": [1, 2]}), target)
    assert pd.read_csv(target)["a"].tolist() == [1, 2]
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert pd.read_csv(target)["a"].tolist() == [1, 2]  # old content intact
    assert [p.name for p in target.parent.iterdir()] == ["x.csv"]  # no temporary left behind


@dataclasses.dataclass
class _Cfg:
    name: str = "x"
    lr: float = 1e-3
    epochs: int = 2
    amp: bool = True
    sizes: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    path: str | None = None


def test_config_layers_defaults_yaml_and_overrides(tmp_path: Path) -> None:
    y = tmp_path / "e.yaml"
    y.write_text("name: e\nlr: 0.01\nsizes: [3]\n")
    cfg = config.load_config(_Cfg, y, ["epochs=5", "amp=false", "path=/a/b", "lr=2e-4"])
    assert cfg == _Cfg(name="e", lr=2e-4, epochs=5, amp=False, sizes=[3], path="/a/b")
    config.save_config(cfg, tmp_path / "run" / "config.yaml")
    assert config.load_config(_Cfg, tmp_path / "run" / "config.yaml") == cfg


def test_config_rejects_unknown_keys_and_bad_types(tmp_path: Path) -> None:
    y = tmp_path / "e.yaml"
    y.write_text("nme: typo\n")
    with pytest.raises(config.ConfigError, match="nme"):
        config.load_config(_Cfg, y)
    with pytest.raises(config.ConfigError, match="epochs"):
        config.load_config(_Cfg, None, ["epochs=abc"])
    with pytest.raises(config.ConfigError, match="not of the form"):
        config.load_config(_Cfg, None, ["epochs"])
    with pytest.raises(config.ConfigError, match="not found"):
        config.load_config(_Cfg, tmp_path / "missing.yaml")


def test_write_bytes_atomic_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.jpg"
    io.write_bytes_atomic(target, b"first")
    io.write_bytes_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["b.jpg"]


def test_fold_lists_of_stages_04_and_06() -> None:
    import argparse

    assert config.parse_folds("0") == [0] and config.parse_folds("-1") == [-1]
    assert config.parse_folds("0,1,2") == [0, 1, 2]
    for bad in ("", "a", "0,0", "1,,x"):
        with pytest.raises(argparse.ArgumentTypeError, match="--fold"):
            config.parse_folds(bad)
