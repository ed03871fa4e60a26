"""Benchmark of the CNN stage on this machine's CPU:

1. samples/s the training data loader delivers per worker process at 384 px with one neighbour on
   each side (3 JPEG reads of a 512 px cache, lung crop, resize, augmentation, normalisation), on a
   synthetic 512 px cache written to a temporary folder;
2. the demo config's training steps/s on CPU (forward + backward + AdamW on random inputs, the
   trainer's loss), channels_last against NCHW, bf16 autocast on the CPU (``cpu_amp``) against
   float32, with the shi2020 attention loss against plain CE in the same run (issue 15: the cost
   of the double backward), and with a light augmentation run in the training process before each
   step (the demo's num_workers=0 path), OpenCV on its default threads against one thread;
3. how many loader workers a GPU needs at the measured rate, for GPU training rates derived from
   timm's published benchmark (results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv in
   huggingface/pytorch-image-models: AMP, channels-last, RTX 3090), scaled by pixel count.

    python bench/bench_loader.py [--samples 300] [--steps 20]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from pe import paths  # noqa: E402
from pe.config import (
    CNNConfig,
    load_config,  # noqa: E402
)
from pe.data.cache import load_boxes, load_index  # noqa: E402
from pe.data.slices import SliceDataset, build_augment, build_slice_table
from pe.models.slice_cnn import build_model  # noqa: E402
from pe.synthetic.caches import write_synthetic_cache
from pe.train.attention import capture_features  # noqa: E402
from pe.train.core import amp_settings  # noqa: E402
from pe.train.losses import build_cnn_loss  # noqa: E402

# The light augmentation of the README's demo trials: the aug* overrides of the benchmark variant.
LIGHT_AUG_VARIANT = paths.CONFIGS_DIR / "bench" / "cnn_light_aug.yaml"


def light_aug_overrides() -> list[str]:
    """The ``aug*`` key=value overrides of :data:`LIGHT_AUG_VARIANT`'s CNN (its epochs etc. left out)."""
    overrides = yaml.safe_load(LIGHT_AUG_VARIANT.read_text())["cnn"]["overrides"]
    return [o for o in overrides if o.split("=", 1)[0].startswith("aug")]

# timm benchmark (RTX 3090, AMP, NHWC, train step): samples/s at the benchmark's image size.
GPU_TRAIN_RATES = {  # model: (samples/s, benchmark img size)
    "tf_efficientnetv2_s": (488.25, 300),
    "seresnext50_32x4d": (814.69, 224),
}


def loader_rate(cache: dict[str, Path], n: int) -> float:
    """Samples/s of one worker (this process, one thread): the dataset's __getitem__ at 384 px."""
    cfg = CNNConfig(img_size=384, neighbors=1, crop_lung=True)
    table = build_slice_table(pd.read_parquet(cache["meta"]), load_index(cache["cache"]), load_boxes(cache["cache"]),
                              cache["cache"])
    ds = SliceDataset(table, cfg, build_augment(cfg))
    rng = np.random.default_rng(0)
    keys = [(int(i), int(s)) for i, s in zip(rng.integers(0, len(ds), n), rng.integers(0, 2**31, n), strict=True)]
    for k in keys[:10]:  # warm-up: imports, OpenCV buffers
        ds[k]
    t0 = time.perf_counter()
    for k in keys:
        ds[k]
    return n / (time.perf_counter() - t0)


def demo_step_rate(steps: int, channels_last: bool | None = None, attention: bool = False,
                   cpu_amp: bool = False, augment: list[str] | None = None) -> tuple[float, CNNConfig]:
    """Train steps/s of the demo config (its threads; channels_last as configured unless given;
    float32 unless ``cpu_amp``: the forward under bf16 autocast, as the trainer runs it).

    ``attention``: the loss is CE + the shi2020 attention term (Grad-CAM inside the graph, double
    backward) with every sample annotated (a random 1/8-area box mask), its most expensive case.
    ``augment``: config overrides of an augmentation run on every sample of the batch before each step,
    in this process (as the demo's ``num_workers: 0`` trainer does), on random uint8 stacks."""
    cfg = load_config(CNNConfig, paths.CONFIGS_DIR / "demo.yaml")
    aug = build_augment(load_config(CNNConfig, paths.CONFIGS_DIR / "demo.yaml", augment)) if augment else None
    if channels_last is not None:
        cfg.channels_last = channels_last
    cfg.cpu_amp = cpu_amp
    use_amp, amp_dtype = amp_settings(torch.device("cpu"), cfg.amp, cfg.amp_dtype, cfg.cpu_amp)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x = torch.randn(cfg.batch_size, 3 * (2 * cfg.neighbors + 1), cfg.img_size, cfg.img_size)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(cfg.batch_size) < 0.3).float()
    cfg.attention_lambda = 1.0 if attention else 0.0
    loss_fn = build_cnn_loss(cfg, 0.0)
    masks = torch.zeros(cfg.batch_size, cfg.img_size, cfg.img_size)
    q = cfg.img_size // 4
    masks[:, q:2 * q, q:3 * q] = 1.0
    batch = {"label": y, "mask": masks, "annotated": torch.ones(cfg.batch_size, dtype=torch.bool),
             "exam": torch.zeros(cfg.batch_size, 9)}

    stacks = np.random.default_rng(0).integers(0, 256, (cfg.batch_size, cfg.img_size, cfg.img_size, x.shape[1]),
                                               dtype=np.uint8)

    def step() -> None:
        if aug is not None:
            for i, a in enumerate(stacks):
                aug.set_random_seed(i)
                aug(image=a)
        with torch.autocast("cpu", dtype=amp_dtype, enabled=use_amp):  # as the trainer decides it
            if attention:
                with capture_features(model.gradcam_layer) as feats:
                    out = model(x)
                out = {**out, "features": feats.value}
            else:
                out = model(x)
        loss = loss_fn(batch, out)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t0), cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=300, help="loader samples to time")
    ap.add_argument("--steps", type=int, default=20, help="demo training steps to time")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = write_synthetic_cache(tmp, n_studies=4, min_slices=30, max_slices=40, size=512, seed=0)
        print(f"synthetic 512 px cache written in {time.perf_counter() - t0:.1f} s")
        rate = loader_rate(cache, args.samples)
    print(f"loader: {rate:.1f} samples/s per worker (384 px, neighbors=1, crop + augmentation, 512 px JPEG cache)")
    for name, (gpu, size) in GPU_TRAIN_RATES.items():
        at384 = gpu * (size / 384) ** 2
        print(f"  {name}: ~{at384:.0f} samples/s at 384 px on an RTX 3090 (timm benchmark {gpu:.0f}/s at {size} px, "
              f"scaled by pixels) -> needs {math.ceil(at384 / rate)} loader workers")
    base, _ = demo_step_rate(args.steps, channels_last=False)
    steps, cfg = demo_step_rate(args.steps)
    print(f"demo model ({cfg.backbone} at {cfg.img_size} px, batch {cfg.batch_size}, {torch.get_num_threads()} "
          f"threads, channels_last={cfg.channels_last}, float32): {steps:.2f} train steps/s = "
          f"{steps * cfg.batch_size:.0f} samples/s on CPU; NCHW baseline {base:.2f} steps/s "
          f"({steps / base:.2f}x)")
    bf16, _ = demo_step_rate(args.steps, cpu_amp=True)
    print(f"same model with cpu_amp (bf16 autocast; oneDNN, AMX / AVX512-BF16 where the CPU has them): {bf16:.2f} "
          f"train steps/s = {bf16 * cfg.batch_size:.0f} samples/s, {bf16 / steps:.2f}x the float32 step above")
    att, _ = demo_step_rate(args.steps, attention=True)
    print(f"attention loss (shi2020, every sample annotated, same model and batch): {att:.2f} train steps/s = "
          f"{att * cfg.batch_size:.0f} samples/s, {steps / att:.2f}x the time of the CE step above")
    light = light_aug_overrides()
    aug_step, _ = demo_step_rate(args.steps, augment=light)
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    aug_step1, _ = demo_step_rate(args.steps, augment=light)
    cv2.setNumThreads(cv2_threads)
    print(f"with the light augmentation ({LIGHT_AUG_VARIANT.name}) run in this process on every sample of the batch "
          f"before each step: {aug_step:.2f} train steps/s with OpenCV's default {cv2_threads} threads, "
          f"{aug_step1:.2f} with OpenCV on 1 thread ({aug_step / steps:.2f}x / {aug_step1 / steps:.2f}x the step "
          f"without augmentation)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.1f} at end (other processes slow these figures down)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
