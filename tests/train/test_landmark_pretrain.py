"""Landmark pretraining (pe.train.landmarks, src/13_pretrain_landmarks.py): targets in the model's input
frame, a backbone that learns the task (beats the mean-target baseline on held-out studies), and
its weights initialising the PE CNN through ``init_from``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pe import paths
from pe.anatomy.landmarks import LANDMARKS
from pe.config import CNNConfig, load_config
from pe.data.cache import load_boxes, load_index
from pe.data.slices import build_slice_table, clip_box
from pe.models.slice_cnn import build_model
from pe.train import landmarks as tl

REPO = Path(__file__).resolve().parents[2]
FAST = ["backbone=test_resnet", "img_size=64", "batch_size=16", "lr=3e-3", "threads=1", "progress=false",
        "num_workers=0", "preload=true", "ema=false", "warmup_epochs=0.2", "drop_path_rate=0", "drop_rate=0"]


def _cfg(cache: Path, meta: Path, extra: list[str]) -> CNNConfig:
    return load_config(CNNConfig, REPO / "src" / "configs" / "demo.yaml",
                       [f"cache_dir={cache}", f"meta_train={meta}", *FAST, *extra])


def test_targets_follow_the_lung_crop(phantom_dir: Path, phantom_meta: dict[str, Path], phantom_cache: Path) -> None:
    cfg = _cfg(phantom_cache, phantom_meta["train"], [])
    meta = pd.read_parquet(phantom_meta["train"])
    lm = tl.read_landmarks(phantom_dir / "phantom_landmarks.csv")
    points = tl.study_points(lm)
    table = build_slice_table(meta, load_index(phantom_cache), load_boxes(phantom_cache), phantom_cache,
                              sorted(set(meta["StudyInstanceUID"])))
    tgt, present = tl.sample_targets(table, meta, points, cfg)
    assert tgt.shape == (len(table), len(LANDMARKS), 3) and present.any()
    i = int(np.flatnonzero(present[:, LANDMARKS.index("heart_centre")])[0])
    code = int(table.sample_study[i])
    study = str(table.studies[code])
    x, y, k = points[study][LANDMARKS.index("heart_centre")]
    size = float(table.box_size[code])
    x0, y0, x1, y1 = clip_box(table.box(code, int(size)), int(size), int(size))
    cols = float(meta.loc[meta["StudyInstanceUID"] == study, "columns"].iloc[0])
    j = LANDMARKS.index("heart_centre")
    assert tgt[i, j, 0] == pytest.approx((x * size / cols - x0) / (x1 - x0), abs=1e-5)
    assert tgt[i, j, 2] == pytest.approx((k - table.sample_slice[i]) / 600, abs=1e-6)
    # The heart centre lies inside the lung box: its normalised position is inside [0, 1].
    assert 0 < tgt[i, j, 0] < 1 and 0 < tgt[i, j, 1] < 1
    # Studies without a landmark row have no present target; unknown names and columns are refused.
    bad = phantom_dir.parent / "bad_landmarks.csv"
    lm.assign(landmark="spleen").to_csv(bad, index=False)
    with pytest.raises(ValueError, match="unknown landmark"):
        tl.read_landmarks(bad)
    lm.drop(columns=["slice_index"]).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="missing column"):
        tl.read_landmarks(bad)


def test_pretraining_learns_and_initialises_the_pe_cnn(phantom_dir: Path, phantom_meta: dict[str, Path],
                                                       phantom_cache: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PE_WORK_DIR", str(tmp_path / "work"))
    torch.manual_seed(0)
    cfg = _cfg(phantom_cache, phantom_meta["train"], ["name=lm", "epochs=6"])
    summary = tl.pretrain_landmarks(cfg, phantom_dir / "phantom_landmarks.csv", val_frac=0.3, stride=1)
    run = paths.models_dir() / "lm"
    assert {"config.yaml", "metrics.jsonl", "last.pt", "backbone.pt", "summary.json"} <= {p.name for p in run.iterdir()}
    # It learns: held-out studies' landmark error below the baseline that predicts the training mean.
    assert summary["val_mse"] < 0.8 * summary["baseline_mse"], summary
    assert 0 < summary["val_error_mm"] < 0.6 * summary["baseline_error_mm"], summary
    # A finished run resumes to the same end (no epoch left): the summary is reproduced.
    again = tl.pretrain_landmarks(cfg, phantom_dir / "phantom_landmarks.csv", val_frac=0.3, stride=1)
    assert again["epoch"] == summary["epoch"] and again["val_mse"] == summary["val_mse"]
    # init_from loads exactly these backbone weights into the PE CNN.
    pe_cnn = build_model(_cfg(phantom_cache, phantom_meta["train"], ["init_from=lm"]))
    saved = torch.load(run / "backbone.pt", weights_only=True)["model"]
    for k, v in pe_cnn.backbone.state_dict().items():
        torch.testing.assert_close(v, saved[k], msg=k)
    with pytest.raises(FileNotFoundError, match="13_pretrain_landmarks"):
        build_model(_cfg(phantom_cache, phantom_meta["train"], ["init_from=missing"]))
