"""GPU benchmark of the real training and inference paths (``make bench-gpu``), with RSPECT projections.

    python bench/bench_gpu.py [--steps 30] [--warmup 5] [--configs src/configs/cnn_*.yaml]
                              [--dtypes fp16 bf16] [--compile off on] [--batch-mult 1 2] [--kernel-studies 3]
    python bench/bench_gpu.py --cpu-smoke   # the same code path on the CPU, tiny config, 2 steps
    python bench/bench_gpu.py --cpu-side    # the kernel path's CPU work alone (decoding, stacking)

1. Training: for each CNN config, the real trainer (pe.train.cnn.Trainer, fold -1 so no validation
   interrupts it) with the config's batch size, loader workers, EMA and channels_last, on a synthetic
   512 px JPEG cache (pe.data.slices.write_synthetic_cache: noisy slices, realistic JPEG sizes) for
   ``warmup + steps`` optimizer steps (stopped by ``stop_after_steps``), per AMP dtype (fp16 / bf16)
   torch.compile off / on and the config's batch size times each ``--batch-mult``. Printed: samples/s over the timed steps, the share of that time the
   training loop waited for the next batch (a share near 0 means the GPU is the bottleneck, a large
   share means more loader workers are needed), and peak GPU memory.
2. Kernel path: pe.infer.studies.iter_studies (DICOM decoding, windowing, resize and JPEG round trip
   in worker processes) + the CNN (random weights) on phantom DICOMs at 512 px, end to end, and the
   model's share alone. The sequence models are left out (tiny next to the CNN).
3. Projections (estimates, from the figures above): RSPECT training hours per epoch, per fold and for
   5 folds; kernel hours for the full test set (2,167 studies, about 0.5-0.6 M images: 0.55 M used).

On a machine without CUDA it says so and exits 0 (``--cpu-smoke`` excepted).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from pe import paths  # noqa: E402
from pe.config import CNNConfig, load_config  # noqa: E402

# RSPECT (RSPECT.md): 1,790,594 training images; positives about 5.4 % (96.5 k, the configs' "77 k in
# 4 folds"). Test: 2,167 studies (650 public = 28 %), images estimated at 0.5-0.6 M.
RSPECT_TRAIN_IMAGES = 1_790_594
RSPECT_POS_IMAGES = 96_540
TEST_IMAGES_ESTIMATE = 550_000
N_FOLDS = 5


@dataclass
class TrainResult:
    config: str
    dtype: str
    compile: bool
    batch: int
    samples_per_s: float
    wait_share: float
    peak_gib: float


class _TimedLoader:
    """Wraps the trainer's DataLoader and records how long each ``next()`` blocked."""

    def __init__(self, loader: Any, waits: list[tuple[float, float]]) -> None:
        self.loader, self.waits = loader, waits

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waits.append((t0, time.perf_counter()))
            yield batch


def bench_train(cfg: CNNConfig, cache: dict[str, Path], warmup: int, steps: int) -> tuple[float, float, float]:
    """(samples/s, data-wait share, peak GiB) of ``steps`` real trainer steps after ``warmup`` ones."""
    from pe.distributed import init_distributed
    from pe.train.cnn import SimulatedCrash, Trainer

    cfg = replace(cfg, cache_dir=str(cache["cache"]), meta_train=str(cache["meta"]), folds_path=str(cache["folds"]),
                  pretrained=False, pretrained_path=None, progress=False, save_every_steps=0, epochs=1000,
                  neg_per_epoch_frac=1.0, stop_after_steps=warmup + steps)
    env = init_distributed()
    stamps: list[float] = []
    waits: list[tuple[float, float]] = []
    trainer = Trainer(cfg, -1, env, on_step=lambda step: stamps.append(time.perf_counter()))
    plain_loader = trainer._loader
    trainer._loader = lambda ds, sampler: _TimedLoader(plain_loader(ds, sampler), waits)  # type: ignore[method-assign]
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    try:
        trainer.fit()
    except SimulatedCrash:
        pass
    if len(stamps) < warmup + steps:
        raise RuntimeError(f"{cfg.name}: only {len(stamps)} steps ran")
    t0, t1 = stamps[warmup - 1] if warmup else stamps[0], stamps[-1]
    n = steps if warmup else steps - 1
    waited = sum(min(b, t1) - max(a, t0) for a, b in waits if b > t0 and a < t1)
    peak = torch.cuda.max_memory_allocated(env.device) / 2**30 if env.device.type == "cuda" else float("nan")
    return n * cfg.batch_size / (t1 - t0), waited / (t1 - t0), peak


def bench_kernel(cfg: CNNConfig, data_dir: Path, work: Path, workers: int,
                 batch_size: int) -> tuple[float, float, float]:
    """(end-to-end slices/s, main-process slices/s, decode-only slices/s) of the kernel's path on the
    test split: DICOM decoding in ``workers`` processes, then in the main process the 2.5D stacking,
    normalisation (on the GPU since 2026-11-28, :mod:`pe.data.stacking`) and the CNN."""
    import pandas as pd

    from pe.infer.studies import iter_studies, load_study, read_study_table
    from pe.models.slice_cnn import build_model, infer_study
    from pe.rspect import SOP, STUDY

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = replace(cfg, pretrained=False, pretrained_path=None)
    model = build_model(cfg).to(device).eval()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    meta, _ = read_study_table(data_dir, "test", work, workers)
    size = int(cfg.cache_size)
    jobs = [(s, g[SOP].tolist(), g["path"].tolist(), size, 95) for s, g in meta.groupby(STUDY, sort=False)]
    n = len(pd.Index(meta[SOP]))
    first = load_study(*jobs[0])  # warm-up: every batch shape of the first study (cuDNN, allocator)
    for _ in range(2):
        infer_study(model, cfg, first.images, first.box, str(device), batch_size, amp=device.type == "cuda")
    t0 = time.perf_counter()
    for _ in iter_studies(jobs, workers, workers + 1):
        pass
    decode_sps = n / (time.perf_counter() - t0)
    t0, main_s = time.perf_counter(), 0.0
    for item in iter_studies(jobs, workers, workers + 1):
        tm = time.perf_counter()
        infer_study(model, cfg, item.images, item.box, str(device), batch_size, amp=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.synchronize()
        main_s += time.perf_counter() - tm
    total = time.perf_counter() - t0
    return n / total, n / max(main_s, 1e-9), decode_sps


def project(cfg: CNNConfig, train_sps: float, model_sps: float, kernel_sps: float) -> dict[str, float]:
    """RSPECT hours (estimates) from measured rates: training samples per epoch on 4 of 5 folds at the
    config's sampling (all positives x pos_oversample + neg_per_epoch_frac of the negatives), plus a
    forward pass over the held-out fold at ``model_sps`` (the kernel's main-process rate: validation
    reads cached JPEGs through loader workers instead, so this is an upper bound), both also given
    apart; the kernel over the estimated test images, per model-fold."""
    train_share = (N_FOLDS - 1) / N_FOLDS
    samples = train_share * (RSPECT_POS_IMAGES * cfg.pos_oversample
                             + (RSPECT_TRAIN_IMAGES - RSPECT_POS_IMAGES) * cfg.neg_per_epoch_frac)
    train_h, val_h = samples / train_sps / 3600, RSPECT_TRAIN_IMAGES / N_FOLDS / model_sps / 3600
    epoch_h = train_h + val_h
    return {"epoch_h": epoch_h, "epoch_train_h": train_h, "epoch_val_h": val_h, "fold_h": epoch_h * cfg.epochs, "five_folds_h": epoch_h * cfg.epochs * N_FOLDS,
            "kernel_h_first_fold": TEST_IMAGES_ESTIMATE / kernel_sps / 3600,
            "kernel_h_per_extra_fold": TEST_IMAGES_ESTIMATE / model_sps / 3600}


def _smoke_config() -> CNNConfig:
    return CNNConfig(name="smoke", backbone="test_efficientnet", cache_size=64, img_size=64, batch_size=4,
                     num_workers=1, amp=False, channels_last=False, ema=True, threads=1, epochs=1,
                     pretrained=False, drop_path_rate=0.0)


def _prepare_data(root: Path, smoke: bool, kernel_studies: int, samples: int = 1_400) -> tuple[dict[str, Path], Path]:
    """A synthetic 512 px training cache (64 px for the smoke run) of at least ``samples`` slices, so that
    every timed run fits in one epoch (no loader restart), and phantom test DICOMs."""
    from pe.synthetic.caches import write_synthetic_cache
    from pe.synthetic.phantom import make_phantom

    size = 64 if smoke else 512
    t0 = time.perf_counter()
    cache = write_synthetic_cache(root / "train", n_studies=2 if smoke else -(-samples // 58) + 1, min_slices=8 if smoke else 50,
                                  max_slices=8 if smoke else 66, size=size, seed=0)
    make_phantom(root / "phantom", train_studies=0, test_studies=1 if smoke else kernel_studies, seed=7, size=size,
                 min_slices=4 if smoke else 60, max_slices=4 if smoke else 80,
                 workers=1 if smoke else min(8, os.cpu_count() or 1))
    print(f"data: synthetic {size} px training cache and phantom test DICOMs in {time.perf_counter() - t0:.0f} s")
    return cache, root / "phantom"


def run(configs: list[tuple[str, CNNConfig]], dtypes: list[str], compiles: list[bool], warmup: int, steps: int,
        kernel_studies: int, kernel_workers: int, smoke: bool, batch_mults: tuple[float, ...] = (1.0,)) -> list[TrainResult]:
    """Every measurement and projection; prints as it goes and returns the training rows."""
    rows: list[TrainResult] = []
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        root = Path(tmp)
        for var in ("PE_WORK_DIR", "PE_OOF_DIR"):
            os.environ[var] = str(root / var.lower())
        largest = max(int(b.batch_size * m) for _, b in configs for m in batch_mults)
        cache, phantom = _prepare_data(root, smoke, kernel_studies, samples=(warmup + steps + 1) * largest)
        settings = [(d, c, m) for d in dtypes for c in compiles for m in batch_mults]
        for name, base in configs:
            best = (0.0, "")
            for dtype, comp, mult in settings:
                cfg = replace(base, amp_dtype=dtype, compile=comp, cache_size=64 if smoke else 512,
                              batch_size=max(1, int(base.batch_size * mult)))
                sps, wait, peak = bench_train(cfg, cache, warmup, steps)
                rows.append(TrainResult(name, dtype, comp, cfg.batch_size, sps, wait, peak))
                print(f"train {name} {dtype} compile={'on' if comp else 'off'} batch {cfg.batch_size} "
                      f"{cfg.img_size} px workers {cfg.num_workers}: {sps:.1f} samples/s, waiting for data "
                      f"{100 * wait:.0f} % of step time, peak "
                      + (f"{peak:.1f} GiB" if peak == peak else "n/a (CPU)"), flush=True)
                best = max(best, (sps, f"{dtype} compile={'on' if comp else 'off'} batch {cfg.batch_size}"))
            kcfg = replace(base, cache_size=64 if smoke else 512)
            k_sps, m_sps, d_sps = bench_kernel(kcfg, phantom, root / f"kwork_{name}", kernel_workers,
                                               batch_size=4 if smoke else 64)
            print(f"kernel {name}: {k_sps:.1f} slices/s end to end ({kernel_workers} decode workers, JPEG round "
                  f"trip, {kcfg.cache_size} px); decoding alone {d_sps:.1f} slices/s; stacking + normalising + "
                  f"CNN in the main process {m_sps:.1f} slices/s", flush=True)
            p = project(base, best[0], m_sps, k_sps)
            print(f"projected (estimate) {name} at its best setting ({best[1]}): {p['epoch_h']:.2f} h per epoch "
                  f"({p['epoch_train_h']:.2f} training + {p['epoch_val_h']:.2f} validation, an upper bound), "
                  f"{p['fold_h']:.1f} h per fold ({base.epochs} epochs), {p['five_folds_h']:.1f} h for 5 folds; "
                  f"kernel on the full test set (~{TEST_IMAGES_ESTIMATE / 1e6:.2f} M images, an estimate): "
                  f"{p['kernel_h_first_fold']:.2f} h with one fold, +{p['kernel_h_per_extra_fold']:.2f} h per "
                  f"further fold", flush=True)
    return rows


def cpu_side(kernel_studies: int, workers: list[int]) -> None:
    """The kernel path's CPU work on any machine: decoding 512 px phantom DICOMs in 1..N worker processes,
    and the main process's crop + resize + stacking + normalising for the default CNN (CPU tensors)."""
    import numpy as np

    from pe.infer.studies import iter_studies, read_study_table
    from pe.models.slice_cnn import preprocess_study
    from pe.rspect import SOP, STUDY
    from pe.synthetic.phantom import make_phantom

    with tempfile.TemporaryDirectory(prefix="bench_cpu_side_") as tmp:
        root = Path(tmp)
        make_phantom(root / "phantom", train_studies=0, test_studies=kernel_studies, seed=7, size=512,
                     min_slices=60, max_slices=80, workers=max(workers))
        meta, _ = read_study_table(root / "phantom", "test", root / "work", max(workers))
        jobs = [(s, g[SOP].tolist(), g["path"].tolist(), 512, 95) for s, g in meta.groupby(STUDY, sort=False)]
        n = len(meta)
        for w in workers:
            t0 = time.perf_counter()
            studies = list(iter_studies(jobs, w, w + 1))
            print(f"decode {w} worker(s): {n / (time.perf_counter() - t0):.1f} slices/s ({n} images, 512 px, "
                  f"pool start-up included)", flush=True)
    cfg = load_config(CNNConfig, paths.CONFIGS_DIR / "cnn_effv2s_512.yaml")
    images = np.concatenate([s.images for s in studies])
    for threads in (1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        for s in range(0, len(images), 64):
            preprocess_study(images, cfg, studies[0].box, range(s, min(s + 64, len(images))))
        print(f"main process, {threads} torch thread(s): crop + resize + stack + normalise "
              f"{len(images) / (time.perf_counter() - t0):.1f} slices/s ({cfg.name} inputs)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=sorted(glob.glob(str(paths.CONFIGS_DIR / "cnn_*.yaml"))))
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps per setting")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, cuDNN autotuning)")
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    ap.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--batch-mult", nargs="+", type=float, default=[1.0],
                    help="also time the config's batch size times these (larger batches: does throughput rise?)")
    ap.add_argument("--kernel-studies", type=int, default=3, help="phantom test studies for the kernel path")
    ap.add_argument("--kernel-workers", type=int, default=2, help="decode processes (the notebook uses 2)")
    ap.add_argument("--cpu-side", action="store_true",
                    help="only the kernel path's CPU work (decoding, stacking), on any machine")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny config, 2 steps, on the CPU: checks the code path")
    args = ap.parse_args(argv)
    compiles = [c == "on" for c in args.compile]
    if args.cpu_side:
        cpu_side(args.kernel_studies, sorted({1, args.kernel_workers}))
        return 0
    if args.cpu_smoke:
        print("cpu smoke run: tiny config, 2 steps, timings meaningless")
        run([("smoke", _smoke_config())], ["fp16"], [False], 0, 2, 1, 1, smoke=True)
        return 0
    if not torch.cuda.is_available():
        print("bench-gpu: no CUDA device on this machine (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a GPU machine, or use --cpu-smoke to check the code path.")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{os.cpu_count()} CPUs")
    configs = [(Path(c).stem, load_config(CNNConfig, c)) for c in args.configs]
    run(configs, args.dtypes, compiles, args.warmup, args.steps, args.kernel_studies, args.kernel_workers, smoke=False,
        batch_mults=tuple(args.batch_mult))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
