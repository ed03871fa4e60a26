"""Stage-2 training: the sequence model (:mod:`pe.models.seq_rnn`) fitted on the competition metric
itself (:func:`pe.eval.metric.torch_metric_loss`), one fold at a time, with the OOF summary that puts
it next to the prior and CNN max-aggregation baselines.

Public API: :func:`fit`, :func:`train_fold`, :func:`oof_summary`, :func:`format_summary`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn
from tqdm import tqdm

from pe import paths
from pe.config import SeqConfig, save_config, to_dict
from pe.data.seq_items import (
    StudySeq,
    available_folds,
    collate,
    load_fold_data,
    load_split_studies,
    read_embedding_index,
)
from pe.data.tables import load_train_labels
from pe.eval.baselines import oof_baselines, succession_rate
from pe.eval.hierarchy import repair_long
from pe.eval.metric import score, torch_metric_loss
from pe.eval.submission import to_long
from pe.io import write_csv_atomic, write_json_atomic
from pe.models.seq_rnn import (
    EV_STD_FLOOR,
    IND_J,
    N_EXAM,
    NEG_J,
    POS_ONLY_J,
    SeqModel,
    cnn_logits,
    input_dim,
    pooled_evidence,
    slice_features,
    standardise_evidence,
    validate_config,
)
from pe.rspect import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY
from pe.train.core import (
    MetricsLog,
    cpu_state_dict,
    make_optimizer,
    make_scheduler,
    resolve_device,
    save_checkpoint,
    seed_everything,
)

# --------------------------------------------------------------------------------------------
# training


def feature_stats(items: list[StudySeq], cfg: SeqConfig) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of every input feature over all training slices (float64 accumulation)."""
    n, s1, s2 = 0, None, None
    for it in items:
        f = slice_features(it.emb, it.probs, cfg).astype(np.float64)
        s1 = f.sum(0) if s1 is None else s1 + f.sum(0)
        s2 = (f * f).sum(0) if s2 is None else s2 + (f * f).sum(0)
        n += len(f)
    mean = s1 / n  # type: ignore[operator]
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))  # type: ignore[operator]
    return mean.astype(np.float32), std.astype(np.float32)


def build_model(items: list[StudySeq], cfg: SeqConfig) -> SeqModel:
    """A model whose input standardisation and exam biases are fitted on ``items`` (training set)."""
    model = SeqModel(input_dim(items[0].emb.shape[1], cfg), cfg)
    model.set_input_stats(*feature_stats(items, cfg))
    # Start at the smoothed training frequencies (as the prior baseline): a label absent from the
    # training folds starts at 1 / (n + 2), not at ~0 (which costs ~9 per held-out positive).
    model.set_prior_bias(exam_prior(items, cfg.conditional_heads))
    if cfg.evidence_heads:
        model.set_evidence_init(*fit_evidence_init(items, cfg))
    return model


def pe_exam(labels: np.ndarray) -> np.ndarray:
    """Bool (N,): exams with PE (neither negative_exam_for_pe nor indeterminate)."""
    return (labels[:, NEG_J] < 0.5) & (labels[:, IND_J] < 0.5)


def exam_prior(items: list[StudySeq], conditional: bool = False) -> np.ndarray:
    """(9,) smoothed training frequencies of the exam labels; with ``conditional`` the seven
    positive-only labels' frequencies among the PE exams (what conditional heads predict)."""
    y = np.stack([it.exam_labels for it in items])
    prior = succession_rate(y.sum(0), len(y))
    if conditional:
        pos = pe_exam(y)
        prior[POS_ONLY_J] = succession_rate(y[pos][:, POS_ONLY_J].sum(0), int(pos.sum()))
    return prior


def study_evidence(items: list[StudySeq], k: int) -> np.ndarray:
    """(N, 3) pooled CNN evidence of every study (:func:`pe.models.seq_rnn.pooled_evidence`)."""
    out = []
    for it in items:
        logit = torch.from_numpy(cnn_logits(it.probs))[None]
        out.append(pooled_evidence(logit, torch.ones_like(logit, dtype=torch.bool), k)[0].numpy())
    return np.stack(out).astype(np.float64)


def fit_evidence_init(items: list[StudySeq], cfg: SeqConfig) -> tuple[np.ndarray, ...]:
    """(mean, std, weight (9, 3), bias (9,)) of the evidence head: per exam label, an L2-regularised
    logistic regression of the label on the standardised pooled evidence of the training studies.
    A label with one class in training gets no slope and its smoothed frequency as intercept."""
    ev = study_evidence(items, cfg.evidence_topk)
    mean, std = ev.mean(0), np.maximum(ev.std(0), EV_STD_FLOOR)
    z = standardise_evidence(ev, mean, std)
    labels = np.stack([it.exam_labels for it in items])
    y = labels > 0.5
    pos = pe_exam(labels)
    weight, bias = np.zeros((N_EXAM, ev.shape[1])), np.zeros(N_EXAM)
    for j in range(N_EXAM):
        rows = pos if cfg.conditional_heads and j in POS_ONLY_J else np.ones(len(y), bool)
        yj = y[rows, j]
        if yj.all() or not yj.any():
            p = float(succession_rate(yj.sum(), len(yj)))
            bias[j] = np.log(p / (1 - p))
            continue
        lr = LogisticRegression(C=1.0).fit(z[rows], yj)
        weight[j], bias[j] = lr.coef_[0], lr.intercept_[0]
    return mean, std, weight, bias


@torch.no_grad()
def predict_items(model: SeqModel, items: list[StudySeq], cfg: SeqConfig, device: torch.device,
                  batch_size: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Logits per study: (list of (n_i,) image logits, (N, 9) exam logits). Batches are formed from
    length-sorted studies so little compute is spent on padding (padding never changes outputs)."""
    model.eval()
    bs = batch_size or cfg.batch_size
    order = sorted(range(len(items)), key=lambda i: len(items[i].sops))
    image: list[np.ndarray] = [np.empty(0)] * len(items)
    exam = np.zeros((len(items), N_EXAM), np.float64)
    for s in range(0, len(order), bs):
        idx = order[s : s + bs]
        batch = collate([items[i] for i in idx], cfg)
        out = model(batch["x"].to(device), batch["mask"].to(device), batch["cnn_logit"].to(device))
        il = out["image_logits"].double().cpu().numpy()
        el = out["exam_logits"].double().cpu().numpy()
        for j, i in enumerate(idx):
            image[i] = il[j, : len(items[i].sops)]
            exam[i] = el[j]
    return image, exam


def metric_from_logits(items: list[StudySeq], image_logits: list[np.ndarray], exam_logits: np.ndarray) -> float:
    """The competition metric over ``items`` computed in one padded float64 batch with the same
    function that trains the model (equal to pe.eval.metric.score on the long table; tested)."""

    lmax = max(len(x) for x in image_logits)
    il = np.zeros((len(items), lmax))
    yt = np.zeros((len(items), lmax))
    mask = np.zeros((len(items), lmax), bool)
    for i, (it, x) in enumerate(zip(items, image_logits, strict=True)):
        il[i, : len(x)] = x
        yt[i, : len(x)] = it.image_labels  # type: ignore[assignment]
        mask[i, : len(x)] = True
    ey = np.stack([it.exam_labels for it in items]).astype(np.float64)
    return float(torch_metric_loss(torch.from_numpy(il), torch.from_numpy(yt), torch.from_numpy(mask),
                                   torch.from_numpy(exam_logits), torch.from_numpy(ey)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def predictions_long(items: list[StudySeq], image_logits: list[np.ndarray], exam_logits: np.ndarray) -> pd.DataFrame:
    """Submission-shaped ``id,label`` rows (images and 9 exam rows per study) from logits."""

    image_df = pd.DataFrame({SOP: np.concatenate([it.sops for it in items]),
                             IMAGE_LABEL: _sigmoid(np.concatenate(image_logits))})
    exam_df = pd.DataFrame(_sigmoid(exam_logits), columns=list(EXAM_LABELS))
    exam_df.insert(0, STUDY, [it.study for it in items])
    return to_long(image_df, exam_df)


def metric_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The stage's loss: the competition metric over the padded batch."""
    return torch_metric_loss(out["image_logits"], batch["image_targets"], batch["mask"],
                             out["exam_logits"], batch["exam_targets"])


def train_metric_epoch(model: nn.Module, train: list[Any], cfg: Any, order: np.ndarray, opt: torch.optim.Optimizer,
                       sched: Any, device: torch.device, desc: str, *,
                       collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
                       forward: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> float:
    """One pass over ``train`` in ``order``, minimising :func:`metric_loss` on batches of ``cfg.batch_size``
    studies (``collate_fn`` pads them, ``forward(model, batch)`` runs the member); returns the mean
    training loss per study. The BiGRU and ConvLSTM stages bind their collate and forward with partial."""
    model.train()
    steps = math.ceil(len(train) / cfg.batch_size)
    total, n = 0.0, 0
    bar = tqdm(range(steps), desc=desc, disable=not cfg.progress, leave=False)
    for s in bar:
        batch = collate_fn([train[i] for i in order[s * cfg.batch_size : (s + 1) * cfg.batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = metric_loss(forward(model, batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        total += loss.item() * len(batch["x"])
        n += len(batch["x"])
        bar.set_postfix(loss=f"{total / n:.4f}")
    return total / n


def _seq_forward(model: SeqModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return model(batch["x"], batch["mask"], batch["cnn_logit"])


def fit(cfg: SeqConfig, train: list[StudySeq], val: list[StudySeq], run_dir: Path | None = None,
        device: torch.device | None = None) -> tuple[SeqModel, dict[str, Any]]:
    """Train with AdamW on the metric, keep the epoch with the best validation metric (early stop).

    Writes ``metrics.jsonl`` and ``best.pt`` into ``run_dir`` when given. Returns the best model
    (weights loaded) and a dict with ``best_epoch`` and ``best_val``.
    """
    validate_config(cfg)
    if not train or not val:
        raise ValueError(f"need training and validation studies, got {len(train)} and {len(val)}")
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    device = device or resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = build_model(train, cfg).to(device)
    epoch_fn = partial(train_metric_epoch, collate_fn=partial(collate, cfg=cfg), forward=_seq_forward)
    return fit_on_metric(cfg, model, train, val, run_dir, device, epoch_fn, predict_items, checkpoint_state)


def fit_on_metric(cfg: Any, model: nn.Module, train: list[Any], val: list[Any], run_dir: Path | None,
                  device: torch.device, train_epoch: Callable[..., float],
                  predict: Callable[..., tuple[list[np.ndarray], np.ndarray]],
                  ckpt_state: Callable[..., dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    """The loop every stage-2 trainer shares (BiGRU/BiLSTM here, ConvLSTM in :mod:`pe.train.convlstm`):
    AdamW, warm-up + cosine per batch, the competition metric on ``val`` after every epoch, ``best.pt``
    on a new best, early stop after ``cfg.patience`` epochs without one, ``metrics.jsonl``. The
    callables are the model kind's epoch, prediction (logits per study) and checkpoint contents."""
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, decay_1d=True)
    steps = math.ceil(len(train) / cfg.batch_size)
    warm = max(1, cfg.warmup_epochs * steps)
    sched = make_scheduler(opt, warm, max(warm + 1, cfg.epochs * steps), cfg.min_lr_ratio)
    rng = np.random.default_rng(cfg.seed)
    best_val, best_epoch, best_state, bad = float("inf"), -1, None, 0
    log = MetricsLog(run_dir / "metrics.jsonl") if run_dir is not None else None
    if log is not None:
        log.start()  # a rerun of the fold starts a fresh log
    for epoch in range(cfg.epochs):
        t0 = time.time()
        train_loss = train_epoch(model, train, cfg, rng.permutation(len(train)), opt, sched, device,
                                 f"{cfg.name} ep{epoch}")
        val_metric = metric_from_logits(val, *predict(model, val, cfg, device))
        record = {"epoch": epoch, "train_loss": train_loss, "val_metric": val_metric,
                  "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 3)}
        if val_metric < best_val - 1e-6:
            best_val, best_epoch, bad = val_metric, epoch, 0
            best_state = cpu_state_dict(model)
            if run_dir is not None:
                save_checkpoint(run_dir / "best.pt", ckpt_state(model, cfg, epoch, val_metric))
        else:
            bad += 1
        record["best_val"] = best_val
        if log is not None:
            log.append(record)
        if bad >= cfg.patience:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    return model, {"best_epoch": best_epoch, "best_val": best_val}


def checkpoint_state(model: SeqModel, cfg: SeqConfig, epoch: int, val_metric: float) -> dict[str, Any]:
    """What ``best.pt`` holds (loads with ``weights_only=True``; see :func:`pe.models.seq_rnn.load_seq_model`)."""
    return {"model": cpu_state_dict(model), "config": to_dict(cfg), "epoch": int(epoch),
            "val_metric": float(val_metric), "in_dim": int(model.in_dim), "exam_labels": list(EXAM_LABELS)}


# --------------------------------------------------------------------------------------------
# one fold end to end, and the OOF summary


def train_fold(cfg: SeqConfig, fold: int) -> dict[str, Any]:
    """Train fold ``fold`` and write run folder, ``oof/<name>/fold<k>.csv`` and ``test_fold<k>.csv``."""
    validate_config(cfg)
    labels = load_train_labels()
    train, val = load_fold_data(cfg, fold, labels)
    run = paths.run_dir(cfg.name, fold)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    device = resolve_device(cfg.device)
    t0 = time.time()
    model, info = fit(cfg, train, val, run, device)
    out_dir = paths.exp_oof_dir(cfg.name)
    il, el = predict_items(model, val, cfg, device)
    write_csv_atomic(predictions_long(val, il, el), out_dir / f"fold{fold}.csv")
    test_dir = paths.embeddings_dir(cfg.cnn_exp, fold, "test")
    if (test_dir / "index.parquet").is_file():
        test = load_split_studies(cfg.cnn_exp, fold, "test", None, cfg.progress)
        til, tel = predict_items(model, test, cfg, device)
        write_csv_atomic(predictions_long(test, til, tel), out_dir / f"test_fold{fold}.csv")
        info["n_test"] = len(test)
    else:
        print(f"warning: {test_dir}/index.parquet not found; no test predictions for fold {fold}")
    info.update(fold=fold, n_train=len(train), n_val=len(val), seconds=round(time.time() - t0, 2))
    return info


def oof_summary(cfg: SeqConfig) -> dict[str, Any] | None:
    """Score every fold whose ``oof/<name>/fold<k>.csv`` exists, before and after the hierarchy
    repair, next to the prior and max-aggregation baselines on the same studies (each baseline fitted
    on the training folds of the fold it predicts). Writes ``oof/<name>/summary.json``."""
    out_dir = paths.exp_oof_dir(cfg.name)
    files = sorted(out_dir.glob("fold*.csv"), key=lambda p: int(p.stem.removeprefix("fold")))
    if not files:
        return None
    labels = load_train_labels()
    index = {j: read_embedding_index(paths.embeddings_dir(cfg.cnn_exp, j, "train") / "index.parquet")
             for j in available_folds(cfg.cnn_exp, "train")}
    done = [int(f.stem.removeprefix("fold")) for f in files]
    for f, k in zip(files, done, strict=True):
        if k not in index:
            raise FileNotFoundError(f"{f}: fold {k} has no embeddings index under work/embeddings/{cfg.cnn_exp}")
    fold_of = pd.concat([pd.Series(j, index=pd.unique(ix[STUDY])) for j, ix in index.items()])
    slice_probs = pd.concat(index.values(), ignore_index=True)
    prior, maxagg = oof_baselines(labels, fold_of, slice_probs, folds=done)
    pred = pd.concat([pd.read_csv(f, dtype={"id": str}) for f in files], ignore_index=True)
    oof_studies = set(fold_of.index[fold_of.isin(done)])
    truth = labels[labels[STUDY].isin(oof_studies)]
    repaired, _ = repair_long(pred, truth[[STUDY, "SeriesInstanceUID", SOP]])
    summary = {
        "name": cfg.name, "folds": done, "n_studies": len(oof_studies), "n_images": len(truth),
        "prior": score(prior, truth),
        "max_aggregation": score(maxagg, truth) if maxagg is not None else float("nan"),
        "sequence_raw": score(pred, truth),
        "sequence_repaired": score(repaired, truth),
    }
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"OOF summary of {s['name']}: folds {s['folds']}, {s['n_studies']} studies, {s['n_images']} images",
             f"  {'prior (training label means)':<40} {s['prior']:.4f}",
             f"  {'max aggregation of CNN slice probs':<40} {s['max_aggregation']:.4f}",
             f"  {'sequence model':<40} {s['sequence_raw']:.4f}",
             f"  {'sequence model + hierarchy repair':<40} {s['sequence_repaired']:.4f}"]
    return "\n".join(lines)
