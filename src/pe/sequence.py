"""Stage 2: a bidirectional GRU/LSTM over a study's per-slice CNN embeddings, trained on the
competition metric itself.

Per slice the input is the embedding, optionally its differences to the previous and next slice
(the 1st-place team's trick: the change between neighbours is what marks a clot entering or leaving
the field) and the CNN's slice probability. The whole series is read without truncation; padded
positions are excluded by per-length reversal (see :class:`BiRNN`) and masks, so padding never
changes an output (tested to 1e-6).

Heads: one per-slice logit for ``pe_present_on_image``; nine exam logits from attention MIL pooling
(a_k = softmax_k(wᵀ tanh(V h_k)), z = Σ_k a_k h_k; papers/suman2021_attention_cnn_bilstm_rspect.txt
section 2.3, after Ilse et al. 2018) concatenated with masked max pooling. The loss is
:func:`pe.metric.torch_metric_loss`, i.e. the weighted log loss of the leaderboard over the batch.

Public API: :class:`SeqConfig`, :class:`SeqModel`, :func:`train_fold`, :func:`load_seq_model`,
:func:`predict_study`, :func:`oof_summary`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pe import paths
from pe.config import from_dict, save_config, to_dict
from pe.io import append_jsonl, atomic_path, write_csv_atomic, write_json_atomic
from pe.rspect import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY

N_EXAM = len(EXAM_LABELS)


@dataclass
class SeqConfig:
    """One stage-2 experiment; YAML files in src/configs/seq_*.yaml override these defaults."""

    name: str = "seq"
    cnn_exp: str = "demo"  # stage-1 experiment whose embeddings are read (work/embeddings/<cnn_exp>/)
    rnn: str = "gru"  # gru | lstm
    layers: int = 2  # 1 or 2 bidirectional layers
    hidden: int = 128  # per direction; the sequence features h_k have 2*hidden channels
    attn_dim: int = 64  # V in the attention pooling maps 2*hidden -> attn_dim
    dropout: float = 0.2  # between RNN layers and before the heads
    input_dropout: float = 0.1  # on the standardised per-slice input
    use_diff: bool = True  # append e_k - e_{k-1} and e_k - e_{k+1}
    use_prob: bool = True  # append the CNN slice probability
    lr: float = 1e-3
    weight_decay: float = 1e-2
    epochs: int = 30
    warmup_epochs: int = 1
    batch_size: int = 16
    patience: int = 8  # epochs without a better validation metric before stopping
    grad_clip: float = 1.0
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default
    folds_path: str | None = None  # default paths.folds_path(); used to check the embeddings' folds
    progress: bool = True  # tqdm bars


def validate_config(cfg: SeqConfig) -> None:
    if cfg.rnn not in ("gru", "lstm"):
        raise ValueError(f"rnn must be 'gru' or 'lstm', got {cfg.rnn!r}")
    if cfg.layers not in (1, 2):
        raise ValueError(f"layers must be 1 or 2, got {cfg.layers}")
    for key in ("hidden", "attn_dim", "epochs", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")


def input_dim(emb_dim: int, cfg: SeqConfig) -> int:
    return emb_dim * (3 if cfg.use_diff else 1) + (1 if cfg.use_prob else 0)


def slice_features(emb: np.ndarray, probs: np.ndarray | None, cfg: SeqConfig) -> np.ndarray:
    """Per-slice model input (n, F) float32 of one study, computed before any padding.

    The end slices have no neighbour on one side; their difference there is 0 (edge replication),
    which is what a slice identical to its neighbour would give.
    """
    e = np.asarray(emb, dtype=np.float32)
    if e.ndim != 2 or e.shape[0] == 0:
        raise ValueError(f"embedding must be (n_slices>0, D), got shape {e.shape}")
    parts = [e]
    if cfg.use_diff:
        prev = np.concatenate([e[:1], e[:-1]], axis=0)
        nxt = np.concatenate([e[1:], e[-1:]], axis=0)
        parts += [e - prev, e - nxt]
    if cfg.use_prob:
        if probs is None:
            raise ValueError("use_prob=True needs the CNN slice probabilities")
        p = np.asarray(probs, dtype=np.float32).reshape(-1, 1)
        if p.shape[0] != e.shape[0]:
            raise ValueError(f"{p.shape[0]} slice probabilities for {e.shape[0]} embeddings")
        parts.append(p)
    return np.concatenate(parts, axis=1)


# --------------------------------------------------------------------------------------------
# model

class BiRNN(nn.Module):
    """Bidirectional GRU/LSTM over padded batches, exact for every sequence length.

    Each direction is a unidirectional RNN over padded input: the forward one never sees the
    trailing padding before a real slice, and the backward one runs on each sequence reversed
    *within its own length* (padding stays at the end), then is reversed back. On CPU this is
    3-5x faster than ``pack_padded_sequence`` (measured: batch 32 × 100 slices, hidden 64, forward +
    backward, LSTM ~130 ms vs ~720 ms, GRU ~360 ms vs ~830 ms on a loaded 2-core CPU), and it is
    padding-invariant by construction.
    """

    def __init__(self, kind: str, input_size: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        cls = nn.GRU if kind == "gru" else nn.LSTM
        sizes = [input_size] + [2 * hidden] * (layers - 1)
        self.fwd = nn.ModuleList(cls(n, hidden, batch_first=True) for n in sizes)
        self.bwd = nn.ModuleList(cls(n, hidden, batch_first=True) for n in sizes)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (B, L, F), lengths (B,) → (B, L, 2*hidden); values at padded positions are undefined."""
        t = torch.arange(x.shape[1], device=x.device)[None, :]
        n = lengths.to(x.device)[:, None]
        rev = torch.where(t < n, n - 1 - t, t).unsqueeze(-1)  # an involution: reverses [0, n) only
        for i, (f, b) in enumerate(zip(self.fwd, self.bwd, strict=True)):
            if i > 0:
                x = self.drop(x)
            hf, _ = f(x)
            hb, _ = b(x.gather(1, rev.expand(-1, -1, x.shape[2])))
            hb = hb.gather(1, rev.expand(-1, -1, hb.shape[2]))
            x = torch.cat([hf, hb], dim=2)
        return x


class SeqModel(nn.Module):
    """Standardise → Linear → BiGRU/BiLSTM → per-slice head + attention/max pooled exam heads."""

    def __init__(self, in_dim: int, cfg: SeqConfig) -> None:
        super().__init__()
        validate_config(cfg)
        self.in_dim = in_dim
        h = cfg.hidden
        # Training-set feature mean/std live in the state dict so the kernel needs nothing else.
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        self.proj = nn.Sequential(nn.Dropout(cfg.input_dropout), nn.Linear(in_dim, h), nn.LayerNorm(h), nn.GELU())
        self.rnn = BiRNN(cfg.rnn, h, h, cfg.layers, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.image_head = nn.Linear(2 * h, 1)
        # Attention MIL pooling (Ilse et al. 2018): a_k = softmax_k(w^T tanh(V h_k)).
        self.attn_v = nn.Linear(2 * h, cfg.attn_dim)
        self.attn_w = nn.Linear(cfg.attn_dim, 1, bias=False)
        # The nine exam heads are the nine output units of one linear layer on [z, max-pool].
        self.exam_head = nn.Linear(4 * h, N_EXAM)

    def set_input_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.in_mean.copy_(torch.as_tensor(mean, dtype=self.in_mean.dtype))
        self.in_std.copy_(torch.as_tensor(np.maximum(std, 1e-6), dtype=self.in_std.dtype))

    def set_prior_bias(self, exam_prior: np.ndarray) -> None:
        """Start the exam heads at the training label frequencies (their log-odds): the model
        begins at the prior baseline's score instead of at 0.69 per row."""
        p = np.clip(np.asarray(exam_prior, dtype=np.float64), 1e-4, 1 - 1e-4)
        with torch.no_grad():
            self.exam_head.bias.copy_(torch.as_tensor(np.log(p / (1 - p)), dtype=self.exam_head.bias.dtype))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, L, F) padded features, mask (B, L) bool (True = real slice).

        Returns image_logits (B, L) (0 at padding), exam_logits (B, 9), attention (B, L) (0 at padding).
        """
        if mask.dtype != torch.bool:
            mask = mask.bool()
        lengths = mask.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("every sequence in a batch needs at least one slice")
        valid = mask.unsqueeze(-1)
        # zero the padding first and after the RNN so even NaN/inf there cannot reach an output
        x = ((x - self.in_mean) / self.in_std).masked_fill(~valid, 0.0)
        x = self.proj(x)
        hseq = self.drop(self.rnn(x, lengths)).masked_fill(~valid, 0.0)
        image_logits = self.image_head(hseq).squeeze(-1).masked_fill(~mask, 0.0)
        scores = self.attn_w(torch.tanh(self.attn_v(hseq))).squeeze(-1)
        scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=1)
        z = torch.bmm(attn.unsqueeze(1), hseq).squeeze(1)
        hmax = hseq.masked_fill(~valid, float("-inf")).amax(dim=1)
        exam_logits = self.exam_head(torch.cat([z, hmax], dim=1))
        return {"image_logits": image_logits, "exam_logits": exam_logits, "attention": attn}


# --------------------------------------------------------------------------------------------
# data


@dataclass
class StudySeq:
    """One study's stage-2 inputs (slices in z order) and, for training data, its labels."""

    study: str
    sops: np.ndarray  # (n,) SOPInstanceUID in z order
    emb: np.ndarray  # (n, D) float16 as stored
    probs: np.ndarray  # (n,) float32 CNN slice probabilities
    image_labels: np.ndarray | None = None  # (n,) float32
    exam_labels: np.ndarray | None = None  # (9,) float32 in EXAM_LABELS order


def collate(items: list[StudySeq], cfg: SeqConfig) -> dict[str, torch.Tensor]:
    """Pad a list of studies to the longest: x (B,L,F), mask (B,L), and targets when labelled."""
    feats = [slice_features(it.emb, it.probs, cfg) for it in items]
    lmax = max(f.shape[0] for f in feats)
    b, fdim = len(items), feats[0].shape[1]
    x = np.zeros((b, lmax, fdim), np.float32)
    mask = np.zeros((b, lmax), bool)
    for i, f in enumerate(feats):
        x[i, : len(f)] = f
        mask[i, : len(f)] = True
    batch = {"x": torch.from_numpy(x), "mask": torch.from_numpy(mask)}
    if all(it.image_labels is not None and it.exam_labels is not None for it in items):
        yi = np.zeros((b, lmax), np.float32)
        for i, it in enumerate(items):
            if len(it.image_labels) != len(feats[i]):  # type: ignore[arg-type]
                raise ValueError(f"study {it.study}: {len(it.image_labels)} image labels for {len(feats[i])} slices")  # type: ignore[arg-type]
            yi[i, : len(feats[i])] = it.image_labels
        batch["image_targets"] = torch.from_numpy(yi)
        batch["exam_targets"] = torch.from_numpy(np.stack([it.exam_labels for it in items]).astype(np.float32))
    return batch


def _read_index(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: embeddings index not found (run src/05_export_embeddings.py)")
    idx = pd.read_parquet(path)
    missing = {STUDY, SOP, "slice_index", "prob"} - set(idx.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    return idx.sort_values([STUDY, "slice_index"], kind="stable")


def load_split_studies(cnn_exp: str, fold: int, split: str, labels: pd.DataFrame | None = None,
                       progress: bool = True) -> list[StudySeq]:
    """All studies of ``work/embeddings/<cnn_exp>/fold<fold>/<split>``, aligned with ``labels``
    (train.csv-like rows keyed by SOPInstanceUID) when given."""
    d = paths.embeddings_dir(cnn_exp, fold, split)
    idx = _read_index(d / "index.parquet")
    if labels is not None:
        # one merge instead of a lookup per study (7,000 studies × 1.8 M label rows on real data)
        cols = [SOP, IMAGE_LABEL, *EXAM_LABELS]
        idx = idx.merge(labels[cols], on=SOP, how="left", validate="one_to_one", indicator=True)
        missing = idx.loc[idx["_merge"] != "both", SOP]
        if len(missing):
            raise ValueError(f"{d}/index.parquet: {len(missing)} SOPInstanceUIDs have no labels, e.g. "
                             f"{missing.tolist()[:3]}")
    out = []
    groups = idx.groupby(STUDY, sort=True)
    for study, g in tqdm(groups, total=idx[STUDY].nunique(), desc=f"load {cnn_exp}/fold{fold}/{split}",
                         disable=not progress, leave=False):
        f = d / f"{study}.npy"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: listed in {d}/index.parquet but missing")
        emb = np.load(f)
        if emb.ndim != 2 or emb.shape[0] != len(g):
            raise ValueError(f"{f}: shape {emb.shape} but the index lists {len(g)} slices")
        item = StudySeq(str(study), g[SOP].to_numpy(dtype=object), emb, g["prob"].to_numpy(np.float32))
        if labels is not None:
            item.image_labels = g[IMAGE_LABEL].to_numpy(np.float32)
            item.exam_labels = g.iloc[0][list(EXAM_LABELS)].to_numpy(np.float32)
        out.append(item)
    return out


def available_folds(cnn_exp: str, split: str = "train") -> list[int]:
    """Folds k >= 0 with an exported ``work/embeddings/<cnn_exp>/fold<k>/<split>/index.parquet``."""
    root = paths.work_dir() / "embeddings" / cnn_exp
    folds = []
    for p in root.glob("fold*"):
        m = re.fullmatch(r"fold(-?\d+)", p.name)
        if m and int(m.group(1)) >= 0 and (p / split / "index.parquet").is_file():
            folds.append(int(m.group(1)))
    return sorted(folds)


def load_train_labels() -> pd.DataFrame:
    """Per-image train labels from the train metadata (it carries every train.csv column)."""
    meta_path = paths.meta_path("train")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: train metadata not found (run src/01_parse_metadata.py)")
    cols = [STUDY, "SeriesInstanceUID", SOP, IMAGE_LABEL, *EXAM_LABELS]
    meta = pd.read_parquet(meta_path)
    missing = set(cols) - set(meta.columns)
    if missing:
        raise ValueError(f"{meta_path}: missing label columns {sorted(missing)}")
    return meta[cols]


def load_fold_data(cfg: SeqConfig, fold: int, labels: pd.DataFrame) -> tuple[list[StudySeq], list[StudySeq]]:
    """(train studies = OOF embeddings of every fold != ``fold``, validation studies of ``fold``).

    Guards against leakage: every study appears once across the folds, and when a folds file exists
    each embeddings folder holds exactly its fold's studies.
    """
    folds = available_folds(cfg.cnn_exp, "train")
    if fold not in folds:
        raise FileNotFoundError(f"{paths.embeddings_dir(cfg.cnn_exp, fold, 'train')}: no exported embeddings "
                                f"for fold {fold} (found folds {folds})")
    if len(folds) < 2:
        raise ValueError(f"stage 2 needs OOF embeddings of at least two folds of {cfg.cnn_exp}, found {folds}")
    per_fold = {j: load_split_studies(cfg.cnn_exp, j, "train", labels, cfg.progress) for j in folds}
    seen: dict[str, int] = {}
    for j, items in per_fold.items():
        for it in items:
            if it.study in seen:
                raise ValueError(f"study {it.study} is in the embeddings of folds {seen[it.study]} and {j}")
            seen[it.study] = j
    fpath = Path(cfg.folds_path) if cfg.folds_path else paths.folds_path()
    if fpath.is_file():
        # read directly (not pe.folds.load_folds, whose sklearn import costs seconds per process)
        fdf = pd.read_csv(fpath, dtype={STUDY: str})
        if not {STUDY, "fold"} <= set(fdf.columns):
            raise ValueError(f"{fpath}: expected columns StudyInstanceUID, fold; got {list(fdf.columns)}")
        expected = dict(zip(fdf[STUDY], fdf["fold"].astype(int), strict=True))
        wrong = [s for s, j in seen.items() if expected.get(s) != j]
        if wrong:
            raise ValueError(f"{len(wrong)} studies are embedded under a fold other than theirs in {fpath}, "
                             f"e.g. {wrong[:3]}: the embeddings would leak")
    train = [it for j in folds if j != fold for it in per_fold[j]]
    return train, per_fold[fold]


# --------------------------------------------------------------------------------------------
# training


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    from pe.metric import succession_rate

    model.set_prior_bias(succession_rate(np.sum([it.exam_labels for it in items], axis=0), len(items)))
    return model


def _metric_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from pe.metric import torch_metric_loss

    return torch_metric_loss(out["image_logits"], batch["image_targets"], batch["mask"],
                             out["exam_logits"], batch["exam_targets"])


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
        out = model(batch["x"].to(device), batch["mask"].to(device))
        il = out["image_logits"].double().cpu().numpy()
        el = out["exam_logits"].double().cpu().numpy()
        for j, i in enumerate(idx):
            image[i] = il[j, : len(items[i].sops)]
            exam[i] = el[j]
    return image, exam


def metric_from_logits(items: list[StudySeq], image_logits: list[np.ndarray], exam_logits: np.ndarray) -> float:
    """The competition metric over ``items`` computed in one padded float64 batch with the same
    function that trains the model (equal to pe.metric.score on the long table; tested)."""
    from pe.metric import torch_metric_loss

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
    from pe.submission import to_long

    image_df = pd.DataFrame({SOP: np.concatenate([it.sops for it in items]),
                             IMAGE_LABEL: _sigmoid(np.concatenate(image_logits))})
    exam_df = pd.DataFrame(_sigmoid(exam_logits), columns=list(EXAM_LABELS))
    exam_df.insert(0, STUDY, [it.study for it in items])
    return to_long(image_df, exam_df)


def _lr_lambda(cfg: SeqConfig, steps_per_epoch: int):
    warm = max(1, cfg.warmup_epochs * steps_per_epoch)
    total = max(warm + 1, cfg.epochs * steps_per_epoch)

    def f(step: int) -> float:  # linear warm-up, then cosine decay to 5 % of the peak
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / (total - warm))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    return f


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
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps))
    rng = np.random.default_rng(cfg.seed)
    best_val, best_epoch, best_state, bad = float("inf"), -1, None, 0
    if run_dir is not None and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()  # a rerun of the fold starts a fresh log
    for epoch in range(cfg.epochs):
        t0 = time.time()
        model.train()
        perm = rng.permutation(len(train))
        total, n = 0.0, 0
        bar = tqdm(range(steps), desc=f"{cfg.name} ep{epoch}", disable=not cfg.progress, leave=False)
        for s in bar:
            batch = collate([train[i] for i in perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]], cfg)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(batch["x"], batch["mask"])
            loss = _metric_loss(out, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            total += loss.item() * len(batch["x"])
            n += len(batch["x"])
            bar.set_postfix(loss=f"{total / n:.4f}")
        il, el = predict_items(model, val, cfg, device)
        val_metric = metric_from_logits(val, il, el)
        record = {"epoch": epoch, "train_loss": total / n, "val_metric": val_metric,
                  "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 3)}
        if val_metric < best_val - 1e-6:
            best_val, best_epoch, bad = val_metric, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if run_dir is not None:
                save_checkpoint(run_dir / "best.pt", model, cfg, epoch, val_metric)
        else:
            bad += 1
        record["best_val"] = best_val
        if run_dir is not None:
            append_jsonl(run_dir / "metrics.jsonl", record)
        if bad >= cfg.patience:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    return model, {"best_epoch": best_epoch, "best_val": best_val}


# --------------------------------------------------------------------------------------------
# checkpoints and inference (used by the Kaggle kernel)


def save_checkpoint(path: Path, model: SeqModel, cfg: SeqConfig, epoch: int, val_metric: float) -> None:
    """Tensors, numbers, strings and dicts only, so it loads with ``weights_only=True``."""
    ckpt = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "config": to_dict(cfg),
            "epoch": int(epoch), "val_metric": float(val_metric), "in_dim": int(model.in_dim),
            "exam_labels": list(EXAM_LABELS)}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_seq_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[SeqModel, SeqConfig]:
    """Rebuild a trained :class:`SeqModel` (eval mode, on ``device``) and its config from best.pt."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: sequence checkpoint not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "config", "in_dim"):
        if key not in ckpt:
            raise ValueError(f"{path}: not a sequence checkpoint (no {key!r})")
    if list(ckpt.get("exam_labels", EXAM_LABELS)) != list(EXAM_LABELS):
        raise ValueError(f"{path}: exam head order {ckpt['exam_labels']} differs from pe.rspect.EXAM_LABELS")
    known = {f.name for f in dataclasses.fields(SeqConfig)}
    cfg = from_dict(SeqConfig, {k: v for k, v in ckpt["config"].items() if k in known}, str(path))
    model = SeqModel(int(ckpt["in_dim"]), cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


@torch.no_grad()
def predict_study(model: SeqModel, cfg: SeqConfig, emb: np.ndarray,
                  probs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """One study (slices in z order): (image probabilities (n,), exam probabilities (9,) in
    EXAM_LABELS order)."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.from_numpy(slice_features(emb, probs, cfg)).unsqueeze(0).to(device)
    if x.shape[-1] != model.in_dim:
        raise ValueError(f"features have {x.shape[-1]} channels, the model expects {model.in_dim} "
                         f"(embedding dim {np.shape(emb)[1]}, use_diff={cfg.use_diff}, use_prob={cfg.use_prob})")
    mask = torch.ones(x.shape[:2], dtype=torch.bool, device=device)
    out = model(x, mask)
    return (torch.sigmoid(out["image_logits"][0]).double().cpu().numpy(),
            torch.sigmoid(out["exam_logits"][0]).double().cpu().numpy())


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
    from pe.baselines import max_aggregation_predictions
    from pe.hierarchy import repair_long
    from pe.metric import prior_predictions, score

    out_dir = paths.exp_oof_dir(cfg.name)
    files = sorted(out_dir.glob("fold*.csv"), key=lambda p: int(p.stem.removeprefix("fold")))
    if not files:
        return None
    labels = load_train_labels()
    index = {j: _read_index(paths.embeddings_dir(cfg.cnn_exp, j, "train") / "index.parquet")
             for j in available_folds(cfg.cnn_exp, "train")}
    studies = {j: set(ix[STUDY]) for j, ix in index.items()}
    ids_cols = [STUDY, "SeriesInstanceUID", SOP]
    preds, priors, maxaggs, done, oof_studies = [], [], [], [], set()
    for f in files:
        k = int(f.stem.removeprefix("fold"))
        if k not in index:
            raise FileNotFoundError(f"{f}: fold {k} has no embeddings index under work/embeddings/{cfg.cnn_exp}")
        train_studies = set().union(*(studies[j] for j in index if j != k))
        train_truth = labels[labels[STUDY].isin(train_studies)]
        preds.append(pd.read_csv(f, dtype={"id": str}))
        priors.append(prior_predictions(train_truth, labels.loc[labels[STUDY].isin(studies[k]), ids_cols]))
        maxaggs.append(max_aggregation_predictions(index[k], train_truth))
        done.append(k)
        oof_studies |= studies[k]
    pred = pd.concat(preds, ignore_index=True)
    truth = labels[labels[STUDY].isin(oof_studies)]
    repaired, _ = repair_long(pred, truth[ids_cols])
    summary = {
        "name": cfg.name, "folds": done, "n_studies": len(oof_studies), "n_images": len(truth),
        "prior": score(pd.concat(priors, ignore_index=True), truth),
        "max_aggregation": score(pd.concat(maxaggs, ignore_index=True), truth),
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
