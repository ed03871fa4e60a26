"""Stage-2 training of the ConvLSTM member (papers/shi2020 section 2.2; :mod:`pe.models.convlstm`) on
the exported reduced feature maps, trained like the BiGRU members: the same folds (OOF maps of every
fold != k train, fold k validates), the competition metric as the loss
(:func:`pe.eval.metric.torch_metric_loss` via :func:`pe.train.seq.metric_loss`), early stopping on the
validation metric, and the same output files (``oof/<name>/fold<k>.csv``, ``test_fold<k>.csv``), so
``src/07_ensemble.py`` and the kernel use it unchanged. ``src/06_train_sequence.py`` dispatches here
for a config with ``model: convlstm`` (:class:`pe.config.ConvLSTMSeqConfig`).

Public API: :func:`build_member`, :func:`fit`, :func:`predict_map_items`, :func:`train_fold`.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pe import paths
from pe.config import ConvLSTMSeqConfig, save_config, to_dict
from pe.data.map_items import MapStudy, collate_maps, load_map_fold_data, load_map_split
from pe.data.tables import load_train_labels
from pe.io import write_csv_atomic
from pe.models.convlstm import ConvLSTMMember, MapReduction, core_config
from pe.rspect import EXAM_LABELS
from pe.train.core import (
    cpu_state_dict,
    resolve_device,
    seed_everything,
)
from pe.train.seq import exam_prior, fit_on_metric, predictions_long, train_metric_epoch


def validate_config(cfg: ConvLSTMSeqConfig) -> None:
    if cfg.model != "convlstm":
        raise ValueError(f"{cfg.name}: model must be 'convlstm', got {cfg.model!r}")
    for key in ("hidden", "units", "attn_dim", "epochs", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.kernel % 2 != 1:
        raise ValueError(f"kernel must be odd, got {cfg.kernel}")


def channel_stats(items: list[MapStudy]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over every stored map cell of the training studies (float64 sums)."""
    n, s1, s2 = 0, 0.0, 0.0
    for it in items:
        x = it.maps.astype(np.float64)
        s1 = s1 + x.sum(axis=(0, 2, 3))
        s2 = s2 + (x * x).sum(axis=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = np.asarray(s1) / n
    return mean.astype(np.float32), np.sqrt(np.maximum(np.asarray(s2) / n - mean * mean, 0.0)).astype(np.float32)


def build_member(items: list[MapStudy], cfg: ConvLSTMSeqConfig, reduction: MapReduction) -> ConvLSTMMember:
    """A member whose input standardisation and exam biases are fitted on ``items`` (training set)."""
    model = ConvLSTMMember(core_config(to_dict(cfg), reduction.out_channels), reduction, cfg.cnn_skip)
    model.set_input_stats(*channel_stats(items))
    model.core.set_prior_bias(exam_prior(items))  # type: ignore[arg-type]  # MapStudy has exam_labels
    return model


def _forward(model: ConvLSTMMember, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return model(batch["x"], batch["map_mask"], batch["rows"], batch["mask"], batch["cnn_logit"])


@torch.no_grad()
def predict_map_items(model: ConvLSTMMember, items: list[MapStudy], cfg: ConvLSTMSeqConfig,
                      device: torch.device) -> tuple[list[np.ndarray], np.ndarray]:
    """(list of (n_i,) image logits, (N, 9) exam logits), batches of length-sorted studies."""
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i].maps))
    image: list[np.ndarray] = [np.empty(0)] * len(items)
    exam = np.zeros((len(items), len(EXAM_LABELS)), np.float64)
    for s in range(0, len(order), cfg.batch_size):
        idx = order[s: s + cfg.batch_size]
        batch = {k: v.to(device) for k, v in collate_maps([items[i] for i in idx]).items()}
        out = _forward(model, batch)
        il, el = out["image_logits"].double().cpu().numpy(), out["exam_logits"].double().cpu().numpy()
        for j, i in enumerate(idx):
            image[i], exam[i] = il[j, : len(items[i].sops)], el[j]
    return image, exam


def checkpoint_state(model: ConvLSTMMember, cfg: ConvLSTMSeqConfig, epoch: int, val_metric: float) -> dict[str, Any]:
    """What ``best.pt`` holds (``weights_only=True``; :func:`pe.models.convlstm.load_convlstm_member`)."""
    return {"model": cpu_state_dict(model), "config": to_dict(cfg), "epoch": int(epoch),
            "val_metric": float(val_metric), "reduction": model.reduction.to_json(),
            "exam_labels": list(EXAM_LABELS)}


def fit(cfg: ConvLSTMSeqConfig, train: list[MapStudy], val: list[MapStudy], reduction: MapReduction,
        run_dir: Path | None = None, device: torch.device | None = None) -> tuple[ConvLSTMMember, dict[str, Any]]:
    """AdamW on the metric, warm-up + cosine, keep the epoch with the best validation metric (as
    :func:`pe.train.seq.fit`). Writes ``metrics.jsonl`` and ``best.pt`` into ``run_dir`` when given."""
    validate_config(cfg)
    if not train or not val:
        raise ValueError(f"need training and validation studies, got {len(train)} and {len(val)}")
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    device = device or resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = build_member(train, cfg, reduction).to(device)
    epoch_fn = partial(train_metric_epoch, collate_fn=collate_maps, forward=_forward)
    return fit_on_metric(cfg, model, train, val, run_dir, device, epoch_fn, predict_map_items, checkpoint_state)


def train_fold(cfg: ConvLSTMSeqConfig, fold: int) -> dict[str, Any]:
    """Train fold ``fold``; write the run folder, ``oof/<name>/fold<k>.csv`` and ``test_fold<k>.csv``."""
    validate_config(cfg)
    train, val, reduction = load_map_fold_data(cfg, fold, load_train_labels())
    run = paths.run_dir(cfg.name, fold)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    device = resolve_device(cfg.device)
    t0 = time.time()
    model, info = fit(cfg, train, val, reduction, run, device)
    out_dir = paths.exp_oof_dir(cfg.name)
    write_csv_atomic(predictions_long(val, *predict_map_items(model, val, cfg, device)),  # type: ignore[arg-type]
                     out_dir / f"fold{fold}.csv")
    test_dir = paths.embeddings_dir(cfg.cnn_exp, fold, "test")
    if (test_dir / "maps" / "reduction.json").is_file() and (test_dir / "index.parquet").is_file():
        test, test_red = load_map_split(cfg.cnn_exp, fold, "test", None, cfg.progress)
        if test_red.to_json() != reduction.to_json():
            raise ValueError(f"{test_dir}/maps: reduction {test_red.to_json()} differs from the training maps' "
                             f"{reduction.to_json()}")
        write_csv_atomic(predictions_long(test, *predict_map_items(model, test, cfg, device)),  # type: ignore[arg-type]
                         out_dir / f"test_fold{fold}.csv")
        info["n_test"] = len(test)
    else:
        print(f"warning: {test_dir}/maps not exported; no test predictions for fold {fold}")
    info.update(fold=fold, n_train=len(train), n_val=len(val), seconds=round(time.time() - t0, 2))
    return info
