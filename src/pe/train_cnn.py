"""Training loop of the 2.5D slice CNN for one fold (single process or torchrun DDP).

Run folder ``paths.run_dir(cfg.name, fold)``: ``config.yaml``, ``metrics.jsonl`` (one line per epoch),
``last.pt`` (every epoch, and every ``save_every_steps`` optimizer steps), ``best.pt`` (lowest
validation loss; the last epoch for ``fold = -1``). OOF slice probabilities of the fold's validation
studies go to ``paths.exp_oof_dir(cfg.name) / f"cnn_fold{fold}.parquet"``, rewritten whenever
``best.pt`` is, so the two always match.

Resume (``resume=True``) restores model, optimizer, scheduler, scaler, EMA, RNG state and the
position inside the epoch from ``last.pt``; the epoch plan and every sample's augmentation depend
only on (seed, epoch, position), so a resumed run takes the same steps as an uninterrupted one.

Exam heads (``exam_heads``): the study's exam labels are copied to its slices. negative_exam_for_pe
and indeterminate are learnt on every slice; the seven positive-only labels (rv/lv, location,
chronicity) only on positive slices, where the label describes the clot the slice shows — on a
negative slice of a positive study they would be noise.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pe import paths
from pe.cnn import CNNConfig, build_model, resolve_paths
from pe.config import save_config, to_dict
from pe.data import (
    EpochBatchSampler,
    SliceDataset,
    SliceTable,
    build_augment,
    build_slice_table,
    normalize,
    shard_batches,
    worker_init_fn,
)
from pe.distributed import DistEnv, all_gather_objects, all_reduce_sum, barrier, cleanup, init_distributed
from pe.folds import check_folds, load_folds
from pe.io import append_jsonl, atomic_path, write_parquet_atomic, write_text_atomic
from pe.rspect import EXAM_LABELS, NEGATIVE_LABELS, SOP, STUDY

POSITIVE_ONLY_MASK = torch.tensor([lab not in NEGATIVE_LABELS for lab in EXAM_LABELS])


class SimulatedCrash(RuntimeError):
    """Raised after ``cfg.stop_after_steps`` optimizer steps (tests of resume)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def slice_loss(logit: torch.Tensor, target: torch.Tensor, cfg: CNNConfig) -> torch.Tensor:
    if cfg.loss == "focal":
        from torchvision.ops import sigmoid_focal_loss

        return sigmoid_focal_loss(logit, target, alpha=-1, gamma=cfg.focal_gamma, reduction="mean")
    if cfg.loss != "bce":
        raise ValueError(f"loss must be 'bce' or 'focal', got {cfg.loss!r}")
    pw = torch.tensor(cfg.pos_weight, device=logit.device) if cfg.pos_weight != 1.0 else None
    return F.binary_cross_entropy_with_logits(logit, target, pos_weight=pw)


def exam_loss(exam_logits: torch.Tensor, exam: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """BCE of the slice-level exam heads, masked as described in the module docstring."""
    mask = torch.ones_like(exam, dtype=torch.bool)
    mask[:, POSITIVE_ONLY_MASK.to(exam.device)] = (label > 0.5).unsqueeze(1)
    mask &= ~torch.isnan(exam)
    bce = F.binary_cross_entropy_with_logits(exam_logits.float(), torch.nan_to_num(exam), reduction="none")
    return (bce * mask).sum() / mask.sum().clamp(min=1)


def make_optimizer(model: nn.Module, cfg: CNNConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-d tensors) without weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _bce_np(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def slice_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC, NaN when only one class is present."""
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


class Trainer:
    """One fold's training run; :meth:`fit` does everything (see the module docstring)."""

    def __init__(self, cfg: CNNConfig, fold: int, env: DistEnv,
                 on_step: Callable[[int], None] | None = None) -> None:
        self.cfg, self.fold, self.env, self.on_step = cfg, fold, env, on_step
        self.run_dir = paths.run_dir(cfg.name, fold)
        self.oof_path = paths.exp_oof_dir(cfg.name) / f"cnn_fold{fold}.parquet"
        self.device = env.device
        self.cuda = self.device.type == "cuda"

    # ----- data -----
    def _tables(self) -> tuple[SliceTable, SliceTable | None]:
        from pe.cache import load_boxes, load_index

        cache, meta_path, folds_path = resolve_paths(self.cfg)
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: train metadata not found (run src/01_parse_metadata.py)")
        meta = pd.read_parquet(meta_path)
        folds = load_folds(folds_path)
        check_folds(folds, meta)
        k = int(folds["fold"].max()) + 1
        if not -1 <= self.fold < k:
            raise ValueError(f"fold {self.fold} not in -1..{k - 1} ({folds_path})")
        index = load_index(cache)
        boxes = load_boxes(cache) if self.cfg.crop_lung else None
        if self.fold == -1:
            train_ids, val_ids = folds[STUDY].tolist(), []
        else:
            train_ids = folds.loc[folds["fold"] != self.fold, STUDY].tolist()
            val_ids = folds.loc[folds["fold"] == self.fold, STUDY].tolist()
        train = build_slice_table(meta, index, boxes, cache, train_ids, drop_replaced=True)
        if np.isnan(train.label).any():
            raise ValueError(f"{meta_path}: pe_present_on_image missing for some training slices")
        val = build_slice_table(meta, index, boxes, cache, val_ids, drop_replaced=False) if val_ids else None
        return train, val

    def _loader(self, ds: SliceDataset, batch_sampler: Any) -> DataLoader:
        # A private generator: DataLoader must not draw from the global torch RNG, or a resumed run
        # would see different dropout/random numbers than an uninterrupted one.
        g = torch.Generator().manual_seed(self.cfg.seed)
        nw = self.cfg.num_workers
        return DataLoader(ds, batch_sampler=batch_sampler, num_workers=nw, pin_memory=self.cuda,
                          worker_init_fn=worker_init_fn, generator=g, persistent_workers=False,
                          prefetch_factor=4 if nw > 0 else None)

    # ----- checkpoints -----
    def _state(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        raw = self.raw_model.state_dict()
        state = {
            "model": self.ema.module.state_dict() if self.ema is not None else raw,
            "config": to_dict(self.cfg), "fold": self.fold, "epoch": epoch, "step": self.step,
            "step_in_epoch": step_in_epoch, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps, "best_val_loss": self.best_val_loss,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "torch_rng": torch.get_rng_state(),
        }
        if self.ema is not None:
            state["train_model"] = raw
        return state

    def _save(self, name: str, state: dict[str, Any]) -> None:
        if self.env.is_main:
            with atomic_path(self.run_dir / name) as tmp:
                torch.save(state, tmp)

    def _restore(self, ckpt: dict[str, Any]) -> tuple[int, int]:
        self.raw_model.load_state_dict(ckpt["train_model"] if self.ema is not None else ckpt["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.step = int(ckpt["step"])
        self.best_val_loss = float(ckpt["best_val_loss"])
        return int(ckpt["epoch"]), int(ckpt["step_in_epoch"])

    # ----- main -----
    def fit(self, resume: bool = False) -> Path:
        cfg, env = self.cfg, self.env
        seed_everything(cfg.seed)
        train, val = self._tables()
        t_load = time.perf_counter()
        train_ds = SliceDataset(train, cfg, build_augment(cfg), preload=cfg.preload, workers=_io_workers(cfg))
        val_ds = SliceDataset(val, cfg, preload=cfg.preload, workers=_io_workers(cfg)) if val is not None else None
        if cfg.preload and env.is_main:
            arrays = [d.slices for d in (train_ds, val_ds) if d is not None and d.slices is not None]
            print(f"preloaded {sum(len(a) for a in arrays)} slices at {cfg.img_size} px "
                  f"({sum(a.nbytes for a in arrays) / 2**20:.0f} MiB) in {time.perf_counter() - t_load:.1f} s", flush=True)
        sampler = EpochBatchSampler(train.label, cfg.batch_size, cfg.seed, cfg.pos_oversample,
                                    cfg.neg_per_epoch_frac, env.rank, env.world_size)
        n_batches = sampler.batches_per_epoch()
        if n_batches == 0:
            raise ValueError(f"{len(train)} training slices give no batch of {cfg.batch_size} x {env.world_size}")
        self.steps_per_epoch = math.ceil(n_batches / cfg.accum_steps)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))

        model = build_model(cfg).to(self.device)
        if cfg.channels_last:  # CUDA and CPU alike (oneDNN's NHWC kernels are faster here too)
            model = model.to(memory_format=torch.channels_last)
        self.raw_model = model
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema_decay)
        self.optimizer = make_optimizer(model, cfg)
        min_ratio = cfg.min_lr / cfg.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, self.total_steps, min_ratio))
        amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
        use_amp = self.cuda and cfg.amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        self.step, self.best_val_loss = 0, float("inf")

        start_epoch, start_step_in_epoch = 0, 0
        last = self.run_dir / "last.pt"
        if resume and last.is_file():
            ckpt = torch.load(last, map_location="cpu", weights_only=True)
            if int(ckpt.get("steps_per_epoch", -1)) != self.steps_per_epoch:
                raise ValueError(f"{last}: saved with {ckpt.get('steps_per_epoch')} steps/epoch, now "
                                 f"{self.steps_per_epoch} (config or data changed); cannot resume")
            start_epoch, start_step_in_epoch = self._restore(ckpt)
            if env.is_main:
                print(f"resumed {last}: epoch {start_epoch}, step {self.step}", flush=True)
        elif resume and env.is_main:
            print(f"no {last}: starting from scratch", flush=True)
        if env.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
            self._trim_metrics(start_epoch if resume else 0)

        ddp_model: nn.Module = model
        if env.distributed:
            ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.cuda else None)

        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch, start_batch=start_step_in_epoch * cfg.accum_steps)
            train_loss, n_seen, t_train = self._train_epoch(ddp_model, train_ds, sampler, epoch,
                                                            start_step_in_epoch, use_amp, amp_dtype)
            start_step_in_epoch = 0
            record: dict[str, Any] = {"epoch": epoch, "step": self.step, "train_loss": train_loss,
                                      "lr": self.optimizer.param_groups[0]["lr"], "time": round(t_train, 2),
                                      "samples_per_s": round(n_seen / max(t_train, 1e-9), 2)}
            improved = self.fold == -1
            if val_ds is not None:
                frame = self._validate(val_ds, use_amp, amp_dtype)
                y = frame["label"].to_numpy()
                record["val_loss"] = _bce_np(frame["prob"].to_numpy(), y)
                record["val_auc"] = slice_auc(y, frame["prob"].to_numpy())
                if record["val_loss"] < self.best_val_loss:
                    self.best_val_loss, improved = record["val_loss"], True
                    if env.is_main:
                        write_parquet_atomic(frame[[SOP, STUDY, "prob"]], self.oof_path)
            state = self._state(epoch + 1, 0)
            if improved:
                self._save("best.pt", state)
            if env.is_main:
                append_jsonl(self.run_dir / "metrics.jsonl", record)
                print(self._summary(record, improved), flush=True)
            self._save("last.pt", state)
            barrier(env)
        return self.run_dir

    def _trim_metrics(self, keep_before_epoch: int) -> None:
        """A fresh run starts an empty log; a resumed one drops epochs it is about to redo."""
        p = self.run_dir / "metrics.jsonl"
        lines = p.read_text().splitlines() if p.is_file() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["epoch"] < keep_before_epoch]
        write_text_atomic(p, "".join(ln + "\n" for ln in kept))

    def _summary(self, r: dict[str, Any], improved: bool) -> str:
        s = (f"[{self.cfg.name} fold{self.fold}] epoch {r['epoch'] + 1}/{self.cfg.epochs} step {r['step']} "
             f"train_loss {r['train_loss']:.4f}")
        if "val_loss" in r:
            s += f" val_loss {r['val_loss']:.4f} val_auc {r['val_auc']:.4f}"
        return s + f" lr {r['lr']:.2e} {r['samples_per_s']:.1f} samples/s {r['time']:.1f}s" + (" *" if improved else "")

    def _train_epoch(self, model: nn.Module, ds: SliceDataset, sampler: EpochBatchSampler, epoch: int,
                     start_step: int, use_amp: bool, amp_dtype: torch.dtype) -> tuple[float, int, float]:
        cfg, env = self.cfg, self.env
        model.train()
        loader = self._loader(ds, sampler)
        n_batches = sampler.batches_per_epoch()
        log_file = None
        if cfg.debug_sample_log:
            Path(cfg.debug_sample_log).mkdir(parents=True, exist_ok=True)
            log_file = open(Path(cfg.debug_sample_log) / f"samples_rank{env.rank}.txt", "a")  # noqa: SIM115
        bar = tqdm(loader, total=len(sampler), desc=f"{cfg.name} f{self.fold} e{epoch + 1}/{cfg.epochs}",
                   disable=not (env.is_main and cfg.progress), leave=False, dynamic_ncols=True)
        loss_sum, n_seen, t0 = 0.0, 0, time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            for b, batch in enumerate(bar, start=start_step * cfg.accum_steps):
                x = normalize(batch["image"].to(self.device, non_blocking=True))
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = batch["label"].to(self.device)
                last_micro = (b + 1) % cfg.accum_steps == 0 or b + 1 == n_batches
                if log_file is not None:
                    log_file.write("".join(f"{epoch}\t{ds.table.sample_sop[i]}\n" for i in batch["index"].tolist()))
                sync = model.no_sync() if (env.distributed and not last_micro) else contextlib.nullcontext()
                with sync:
                    with torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_amp):
                        out = model(x)
                    # The loss sees the odds of the resampled epoch (see SliceCNN.logit_offset).
                    loss = slice_loss(out["logit"].float() + self.raw_model.logit_offset, y, cfg)
                    if "exam_logits" in out:
                        loss = loss + cfg.exam_loss_weight * exam_loss(out["exam_logits"], batch["exam"].to(self.device), y)
                    self.scaler.scale(loss / cfg.accum_steps).backward()
                loss_sum += float(loss.detach()) * len(y)
                n_seen += len(y)
                if last_micro:
                    self._optimizer_step(epoch, (b + 1 + cfg.accum_steps - 1) // cfg.accum_steps)
                bar.set_postfix(loss=f"{loss_sum / max(n_seen, 1):.4f}",
                                sps=f"{n_seen / max(time.perf_counter() - t0, 1e-9):.1f}")
        finally:
            if log_file is not None:
                log_file.close()
            bar.close()
        total_loss, total_n = all_reduce_sum(env, [loss_sum, float(n_seen)])
        return total_loss / max(total_n, 1), int(total_n), time.perf_counter() - t0

    def _optimizer_step(self, epoch: int, step_in_epoch: int) -> None:
        cfg = self.cfg
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.raw_model, step=self.step)
        self.step += 1
        if self.on_step is not None:
            self.on_step(self.step)
        if cfg.save_every_steps and self.step % cfg.save_every_steps == 0 and step_in_epoch < self.steps_per_epoch:
            self._save("last.pt", self._state(epoch, step_in_epoch))
        if cfg.stop_after_steps and self.step >= cfg.stop_after_steps:
            raise SimulatedCrash(f"stop_after_steps={cfg.stop_after_steps} reached at step {self.step}")

    @torch.inference_mode()
    def _validate(self, ds: SliceDataset, use_amp: bool, amp_dtype: torch.dtype) -> pd.DataFrame:
        """Slice probabilities of every validation slice (sharded over ranks, gathered on all)."""
        cfg, env = self.cfg, self.env
        model = self.ema.module if self.ema is not None else self.raw_model
        model.eval()
        val = ds.table
        batches = shard_batches(len(val), cfg.val_batch_size, env.rank, env.world_size)
        loader = self._loader(ds, batches)
        idx_parts, prob_parts = [], []
        for batch in tqdm(loader, total=len(batches), desc="val", leave=False,
                          disable=not (env.is_main and cfg.progress), dynamic_ncols=True):
            x = normalize(batch["image"].to(self.device, non_blocking=True))
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_amp):
                logit = model(x)["logit"]
            prob_parts.append(torch.sigmoid(logit.float()).cpu().numpy())
            idx_parts.append(batch["index"].numpy())
        model.train()
        mine = (np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64),
                np.concatenate(prob_parts) if prob_parts else np.zeros(0, np.float32))
        gathered = all_gather_objects(env, mine)
        idx = np.concatenate([g[0] for g in gathered])
        prob = np.concatenate([g[1] for g in gathered])
        order = np.argsort(idx)
        frame = val.frame().iloc[idx[order]].reset_index(drop=True)
        frame["prob"] = prob[order].astype(np.float32)
        frame["label"] = frame.pop("pe_present_on_image")
        return frame


def _io_workers(cfg: CNNConfig) -> int:
    """Threads that preload the cache: the loader workers' share of the machine, at least 2."""
    return max(2, cfg.num_workers, cfg.threads)


def train_fold(cfg: CNNConfig, fold: int, resume: bool = False,
               on_step: Callable[[int], None] | None = None) -> Path:
    """Train ``cfg`` on ``fold`` (-1 = all folds) in this process (or as one torchrun rank);
    returns the run folder."""
    env = init_distributed()
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return Trainer(cfg, fold, env, on_step).fit(resume=resume)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (tests) keeps its setting
        cleanup(env)
