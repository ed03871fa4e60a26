"""bench/bench_loader.py times the light augmentation that the benchmark variant cnn_light_aug trains with:
it reads the variant's aug* overrides (one source), and they build a real augmentation."""

from __future__ import annotations

import importlib.util

import numpy as np

from pe import paths


def test_the_bench_reads_the_variants_augmentation_and_it_builds() -> None:
    from pe.config import CNNConfig, load_config
    from pe.data.slices import build_augment

    spec = importlib.util.spec_from_file_location("bench_loader", paths.REPO_ROOT / "bench" / "bench_loader.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    light = mod.light_aug_overrides()
    assert "aug=true" in light and all(o.split("=")[0].startswith("aug") for o in light)
    assert not any(o.startswith(("epochs=", "val_every=")) for o in light)  # the variant's schedule is left out
    cfg = load_config(CNNConfig, paths.CONFIGS_DIR / "demo.yaml", light)
    assert cfg.aug and cfg.aug_cutout_p == 0 and cfg.aug_scale == 0.05
    aug = build_augment(cfg)
    x = np.random.default_rng(0).integers(0, 256, (64, 64, 9), dtype=np.uint8)
    aug.set_random_seed(0)
    out = aug(image=x)["image"]
    assert out.shape == x.shape and out.dtype == np.uint8
