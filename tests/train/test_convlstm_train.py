"""The ConvLSTM member's training (pe.train.convlstm): on a tiny synthetic set whose evidence is in the
maps only, trained on the competition metric, it beats the prior baseline on held-out studies; and
src/06_train_sequence.py dispatches on ``model: convlstm`` while the BiGRU configs stay as they were."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from pe import paths
from pe.data.map_items import MapStudy, collate_maps
from pe.models.convlstm import MapReduction, slab_rows
from pe.rspect import EXAM_LABELS

POSITIVE_EXAM = {"leftsided_pe": 1.0, "rightsided_pe": 1.0, "rv_lv_ratio_lt_1": 1.0}


def _studies(n: int, rng: np.random.Generator, slab_every: int = 1, k: int = 4) -> list[MapStudy]:
    """Studies of 6-10 slices; half have a run of 2-4 PE slices, each carrying a bump in channel 0 at a
    random cell (channels 1, 2 are noise). The CNN probabilities are constant: no evidence there."""
    out = []
    for i in range(n):
        length = int(rng.integers(6, 11))
        y = np.zeros(length, np.float32)
        if i % 2:
            lo = int(rng.integers(0, length - 2))
            y[lo: lo + int(rng.integers(2, 4))] = 1
        maps = rng.normal(0, 0.3, (length, 3, k, k)).astype(np.float32)
        for t in np.flatnonzero(y):
            maps[t, 0, rng.integers(0, k), rng.integers(0, k)] += 2.5
        exam = np.zeros(len(EXAM_LABELS), np.float32)
        if y.any():
            for lab, v in POSITIVE_EXAM.items():
                exam[EXAM_LABELS.index(lab)] = v
        else:
            exam[EXAM_LABELS.index("negative_exam_for_pe")] = 1.0
        stored, rows = slab_rows(length, slab_every)
        out.append(MapStudy(f"{i:012x}", np.array([f"{i:06x}{t:06x}" for t in range(length)], dtype=object),
                            maps[stored].astype(np.float16), rows, np.full(length, 0.3, np.float32), y, exam))
    return out


def test_collate_pads_maps_and_slices_separately() -> None:
    items = _studies(3, np.random.default_rng(0), slab_every=2)
    batch = collate_maps(items)
    n = [len(it.sops) for it in items]
    m = [len(it.maps) for it in items]
    assert batch["x"].shape == (3, max(m), 3, 4, 4) and batch["mask"].shape == (3, max(n))
    assert batch["map_mask"].sum(1).tolist() == m and batch["mask"].sum(1).tolist() == n
    assert int(batch["rows"].max()) == max(m) - 1 and batch["exam_targets"].shape == (3, 9)


def test_convlstm_member_beats_the_prior_on_held_out_studies() -> None:
    from pe.config import ConvLSTMSeqConfig
    from pe.train.convlstm import fit, predict_map_items
    from pe.train.seq import exam_prior, metric_from_logits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        train, val = _studies(48, rng), _studies(24, rng)
        cfg = ConvLSTMSeqConfig(name="conv_t", hidden=8, attn_dim=8, dropout=0.1, head_dropout=0.0, lr=1e-2,
                                epochs=12, patience=12, batch_size=8, device="cpu", progress=False)
        red = MapReduction(k=4, channels=3, in_features=3)
        model, info = fit(cfg, train, val, red)
        il, el = predict_map_items(model, val, cfg, torch.device("cpu"))
        got = metric_from_logits(val, il, el)
        p_img = float(np.mean(np.concatenate([it.image_labels for it in train])))
        prior_exam = np.log(exam_prior(train) / (1 - exam_prior(train)))
        prior = metric_from_logits(val, [np.full(len(it.sops), np.log(p_img / (1 - p_img))) for it in val],
                                   np.tile(prior_exam, (len(val), 1)))
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    print(f"ConvLSTM member on synthetic maps: metric {got:.4f} vs prior {prior:.4f} "
          f"(best epoch {info['best_epoch']}, {elapsed:.1f} s)")
    assert got == pytest.approx(info["best_val"], rel=1e-6)
    assert got < 0.8 * prior, (got, prior)
    assert elapsed < 60


def test_06_dispatches_on_the_model_key(load_script, tmp_path) -> None:
    from pe.config import ConfigError, ConvLSTMSeqConfig, SeqConfig, load_config
    from pe.train import seq

    script = load_script("06_train_sequence.py")
    conv_yaml = str(paths.REPO_ROOT / "src" / "configs" / "seq_demo_convlstm.yaml")
    cls, train = script.stage_of(conv_yaml, [])
    assert cls is ConvLSTMSeqConfig and train.__module__ == "pe.train.convlstm"
    cfg = load_config(cls, conv_yaml)
    assert cfg.model == "convlstm" and cfg.cnn_exp == "demo"
    gru_yaml = str(paths.REPO_ROOT / "src" / "configs" / "seq_demo_gru.yaml")
    assert script.stage_of(gru_yaml, []) == (SeqConfig, seq.train_fold)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: transformer\n")
    with pytest.raises(ConfigError, match="transformer"):
        script.stage_of(str(bad), [])
    assert script.stage_of(str(bad), ["model=convlstm"])[0] is ConvLSTMSeqConfig
