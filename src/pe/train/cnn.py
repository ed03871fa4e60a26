"""Training loop of the 2.5D slice CNN for one fold (single process or torchrun DDP).

Run folder ``paths.run_dir(cfg.name, fold)``: ``config.yaml``, ``metrics.jsonl`` (one line per epoch),
``last.pt`` (every epoch, and every ``save_every_steps`` optimizer steps), ``best.pt`` (lowest
validation loss; the last epoch for ``fold = -1``). OOF slice probabilities of the fold's validation
studies go to ``paths.cnn_oof_path(cfg.name, fold)``, rewritten whenever
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
import math
import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pe import paths
from pe.config import CNNConfig, resolve_paths, save_config, to_dict
from pe.data.annotations import SampleMasks, sample_masks
from pe.data.cache import load_boxes, load_index
from pe.data.folds import check_folds, load_folds
from pe.data.slices import (
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
from pe.eval.metric import auc
from pe.explain.cam import cam_module
from pe.io import write_parquet_atomic
from pe.models.dual_hop import build_training_model
from pe.rspect import IMAGE_LABEL, SOP, STUDY
from pe.train.attention import capture_features
from pe.train.core import (
    MetricsLog,
    amp_settings,
    load_checkpoint,
    make_ema,
    make_optimizer,
    make_scaler,
    make_scheduler,
    save_checkpoint,
    seed_everything,
)
from pe.train.losses import AttentionSliceLoss, LossFn, build_cnn_loss


class SimulatedCrash(RuntimeError):
    """Raised after ``cfg.stop_after_steps`` optimizer steps (tests of resume)."""


def _bce_np(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


class Trainer:
    """One fold's training run; :meth:`fit` does everything (see the module docstring)."""

    def __init__(self, cfg: CNNConfig, fold: int, env: DistEnv, on_step: Callable[[int], None] | None = None,
                 loss_fn: LossFn | None = None) -> None:
        self.cfg, self.fold, self.env, self.on_step = cfg, fold, env, on_step
        self.loss_fn = loss_fn  # default: SliceLoss(cfg, model.logit_offset), built with the model
        self.log = MetricsLog(paths.run_dir(cfg.name, fold) / "metrics.jsonl")
        self.run_dir = paths.run_dir(cfg.name, fold)
        self.oof_path = paths.cnn_oof_path(cfg.name, fold)
        self.device = env.device
        self.cuda = self.device.type == "cuda"
        self.attention = False  # set by _build: cfg.attention_lambda > 0
        self._att_layer: nn.Module | None = None  # the module whose output the attention's Grad-CAM reads
        self._extra: dict[str, float] = {}  # extra per-epoch training figures (train_attention_loss)

    # ----- data -----
    def _tables(self) -> tuple[SliceTable, SliceTable | None]:

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
        self.meta = meta
        return train, val

    def _attention_masks(self, train: SliceTable) -> SampleMasks | None:
        """The training samples' embolus masks for the attention loss (None when it is off)."""
        cfg = self.cfg
        if cfg.attention_lambda <= 0:
            return None
        source = Path(cfg.attention_source) if cfg.attention_source else paths.data_dir() / "train_boxes.csv"
        masks = sample_masks(train, self.meta, source, cfg.attention_studies_frac, cfg.attention_every_mm,
                             cfg.attention_negatives, cfg.seed)
        if self.env.is_main:
            pos = train.label > 0.5
            print(f"attention loss (lambda {cfg.attention_lambda}): masks from {source}: "
                  f"{int((masks.annotated & pos).sum())} of {int(pos.sum())} positive and "
                  f"{int((masks.annotated & ~pos).sum())} negative training slices", flush=True)
        return masks

    def _loader(self, ds: SliceDataset, batch_sampler: Any) -> DataLoader:
        # A private generator: DataLoader must not draw from the global torch RNG, or a resumed run
        # would see different dropout/random numbers than an uninterrupted one.
        g = torch.Generator().manual_seed(self.cfg.seed)
        nw = self.cfg.num_workers
        # Workers start from the forkserver, not by fork(): a fork of a process whose OpenCV / OpenMP
        # thread pools have run inherits their locks, and the child hangs when it reconfigures them
        # (seen: cv2.setNumThreads in worker_init_fn deadlocked a forked worker under pytest-xdist).
        ctx = mp.get_context("forkserver") if nw > 0 else None
        return DataLoader(ds, batch_sampler=batch_sampler, num_workers=nw, pin_memory=self.cuda,
                          worker_init_fn=worker_init_fn, generator=g, persistent_workers=False,
                          prefetch_factor=4 if nw > 0 else None, multiprocessing_context=ctx)

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
            save_checkpoint(self.run_dir / name, state)

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
        train_ds, val_ds, sampler = self._datasets()
        self._build(int(round(cfg.warmup_epochs * self.steps_per_epoch)))
        start_epoch, start_step_in_epoch = self._resume() if resume else (0, 0)
        if env.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
            self.log.start(start_epoch if resume else 0)
        train_model: nn.Module = self.raw_model
        if env.distributed:
            train_model = nn.parallel.DistributedDataParallel(
                train_model, device_ids=[self.device.index] if self.cuda else None)
        if cfg.compile and cfg.attention_lambda > 0:
            raise ValueError("compile=true and attention_lambda > 0: the attention loss captures a feature map "
                             "with a forward hook, which torch.compile does not see; turn one off")
        if cfg.compile:  # the training forward only; checkpoints and validation use the plain module
            train_model = torch.compile(train_model)
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch, start_batch=start_step_in_epoch * cfg.accum_steps)
            train_loss, n_seen, t_train = self._train_epoch(train_model, train_ds, sampler, epoch, start_step_in_epoch)
            start_step_in_epoch = 0
            record: dict[str, Any] = {"epoch": epoch, "step": self.step, "train_loss": train_loss, **self._extra,
                                      "lr": self.optimizer.param_groups[0]["lr"], "time": round(t_train, 2),
                                      "samples_per_s": round(n_seen / max(t_train, 1e-9), 2)}
            validate = val_ds is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs)
            improved = self._evaluate(val_ds, record) if validate else self.fold == -1
            state = self._state(epoch + 1, 0)
            if improved:
                self._save("best.pt", state)
            if env.is_main:
                self.log.append(record)
                print(self._summary(record, improved), flush=True)
            self._save("last.pt", state)
            barrier(env)
        return self.run_dir

    def _datasets(self) -> tuple[SliceDataset, SliceDataset | None, EpochBatchSampler]:
        """Training and validation datasets and the epoch sampler; sets the steps per epoch and in all."""
        cfg, env = self.cfg, self.env
        train, val = self._tables()
        t_load = time.perf_counter()
        train_ds = SliceDataset(train, cfg, build_augment(cfg), preload=cfg.preload, workers=_io_workers(cfg),
                                masks=self._attention_masks(train))
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
        return train_ds, val_ds, sampler

    def _evaluate(self, val_ds: SliceDataset, record: dict[str, Any]) -> bool:
        """Adds val_loss / val_auc to ``record``; on a new best loss writes the OOF file, returns True."""
        frame = self._validate(val_ds)
        y, p = frame["label"].to_numpy(), frame["prob"].to_numpy()
        record["val_loss"] = _bce_np(p, y)
        record["val_auc"] = auc(y, p)
        if record["val_loss"] >= self.best_val_loss:
            return False
        self.best_val_loss = record["val_loss"]
        if self.env.is_main:
            write_parquet_atomic(frame[[SOP, STUDY, "prob"]], self.oof_path)
        return True

    def _build(self, warmup: int) -> None:
        """Model (channels_last on CUDA and CPU alike: oneDNN's NHWC kernels are faster here too),
        EMA, optimiser, schedule, AMP scaler and loss."""
        cfg = self.cfg
        model = build_training_model(cfg, self.fold).to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.raw_model = model
        self.ema = make_ema(model, cfg.ema, cfg.ema_decay)
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, warmup, self.total_steps, cfg.min_lr / cfg.lr)
        self.use_amp, self.amp_dtype = amp_settings(self.device, cfg.amp, cfg.amp_dtype, cfg.cpu_amp)
        self.scaler = make_scaler(self.use_amp, self.amp_dtype)
        self.loss_fn = self.loss_fn or build_cnn_loss(cfg, model.logit_offset)
        self.attention = cfg.attention_lambda > 0
        if self.attention:  # a wrong attention_layer fails here, before any training
            self._att_layer = cam_module(model, cfg.attention_layer, f"CNN config {cfg.name!r}, attention_layer")
        self.step, self.best_val_loss = 0, float("inf")

    def _resume(self) -> tuple[int, int]:
        """(epoch, step in epoch) to start at: restored from ``last.pt`` when there is one."""
        last = self.run_dir / "last.pt"
        if not last.is_file():
            if self.env.is_main:
                print(f"no {last}: starting from scratch", flush=True)
            return 0, 0
        ckpt = load_checkpoint(last, ("model", "optimizer", "scheduler", "step"), "CNN checkpoint")
        if int(ckpt.get("steps_per_epoch", -1)) != self.steps_per_epoch:
            raise ValueError(f"{last}: saved with {ckpt.get('steps_per_epoch')} steps/epoch, now "
                             f"{self.steps_per_epoch} (config or data changed); cannot resume")
        start = self._restore(ckpt)
        if self.env.is_main:
            print(f"resumed {last}: epoch {start[0]}, step {self.step}", flush=True)
        return start

    def _summary(self, r: dict[str, Any], improved: bool) -> str:
        s = (f"[{self.cfg.name} fold{self.fold}] epoch {r['epoch'] + 1}/{self.cfg.epochs} step {r['step']} "
             f"train_loss {r['train_loss']:.4f}")
        if "train_attention_loss" in r:
            s += f" (attention {r['train_attention_loss']:.4f})"
        if "val_loss" in r:
            s += f" val_loss {r['val_loss']:.4f} val_auc {r['val_auc']:.4f}"
        return s + f" lr {r['lr']:.2e} {r['samples_per_s']:.1f} samples/s {r['time']:.1f}s" + (" *" if improved else "")

    def _train_epoch(self, model: nn.Module, ds: SliceDataset, sampler: EpochBatchSampler, epoch: int,
                     start_step: int) -> tuple[float, int, float]:
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
        att_sum, att_batches = 0.0, 0
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
                    with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                        out = self._forward(model, x)
                    loss = self.loss_fn(self._loss_batch(batch, y), out)
                    if self.attention and isinstance(self.loss_fn, AttentionSliceLoss):
                        att_sum, att_batches = att_sum + self.loss_fn.last[1], att_batches + 1
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
        total_loss, total_n, att_total, att_n = all_reduce_sum(env, [loss_sum, float(n_seen), att_sum, float(att_batches)])
        self._extra = {"train_attention_loss": att_total / att_n} if att_n else {}
        return total_loss / max(total_n, 1), int(total_n), time.perf_counter() - t0

    def _forward(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training forward; with the attention loss also the Grad-CAM layer's feature map
        (``features``, still in the graph: the loss differentiates the CAM through it)."""
        if not self.attention:
            return model(x)
        with capture_features(self._att_layer) as feats:
            out = model(x)
        return {**out, "features": feats.value}

    def _loss_batch(self, batch: dict[str, Any], y: torch.Tensor) -> dict[str, Any]:
        """What the loss sees: the batch's targets on the model's device."""
        out: dict[str, Any] = {"label": y}
        if "exam" in batch:
            out["exam"] = batch["exam"].to(self.device)
        for key in ("mask", "annotated"):
            if key in batch:
                out[key] = batch[key].to(self.device, non_blocking=True)
        return out

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
    def _validate(self, ds: SliceDataset) -> pd.DataFrame:
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
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
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


def pooled_oof_auc(cfg: CNNConfig, folds: list[int]) -> tuple[float, int, int]:
    """Slice AUC of the written out-of-fold files of ``folds`` pooled together (one ranking over every
    validation slice, so folds whose models are calibrated differently cost AUC here, as they do
    downstream): (AUC, slices, positive slices). Labels from the train metadata the config names."""
    _, meta_path, _ = resolve_paths(cfg)
    files = [paths.cnn_oof_path(cfg.name, k) for k in folds]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"out-of-fold file(s) not written: {', '.join(missing)}")
    oof = pd.concat([pd.read_parquet(f, columns=[SOP, "prob"]) for f in files], ignore_index=True)
    labels = pd.read_parquet(meta_path, columns=[SOP, IMAGE_LABEL])
    m = oof.merge(labels, on=SOP, how="left", validate="one_to_one")
    if m[IMAGE_LABEL].isna().any():
        raise ValueError(f"{meta_path}: no {IMAGE_LABEL} for {int(m[IMAGE_LABEL].isna().sum())} out-of-fold slices")
    y = m[IMAGE_LABEL].to_numpy(dtype=float)
    return auc(y, m["prob"].to_numpy()), len(m), int(y.sum())


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
