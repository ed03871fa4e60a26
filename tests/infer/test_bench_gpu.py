"""bench/bench_gpu.py (make bench-gpu): says so and exits 0 without CUDA; its --cpu-smoke path runs the
real trainer (with the compile option honoured) and the kernel path, so the script cannot rot; the
RSPECT projection is the documented arithmetic."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from pe.config import CNNConfig

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def test_cpu_only_machine_says_so_and_exits_0(bench: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out and "train " not in out


def test_projection_is_the_documented_arithmetic(bench: ModuleType) -> None:
    cfg = CNNConfig(pos_oversample=1.0, neg_per_epoch_frac=1.0, epochs=3)
    p = bench.project(cfg, train_sps=100.0, model_sps=400.0, kernel_sps=50.0)
    n = bench.RSPECT_TRAIN_IMAGES
    assert p["epoch_h"] == pytest.approx((0.8 * n / 100 + 0.2 * n / 400) / 3600)
    assert p["fold_h"] == pytest.approx(3 * p["epoch_h"]) and p["five_folds_h"] == pytest.approx(15 * p["epoch_h"])
    assert p["kernel_h_first_fold"] == pytest.approx(bench.TEST_IMAGES_ESTIMATE / 50 / 3600)
    fewer = bench.project(CNNConfig(neg_per_epoch_frac=0.3, epochs=3), 100.0, 400.0, 50.0)
    assert fewer["epoch_h"] < p["epoch_h"]  # sampling 30 % of the negatives shortens the epoch


@pytest.mark.slow
def test_cpu_smoke_runs_trainer_with_compile_and_kernel_path(bench: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    compiled: list[type] = []

    def spy(module: torch.nn.Module, *a, **k) -> torch.nn.Module:  # real compilation is minutes on a CPU
        compiled.append(type(module))
        return module

    monkeypatch.setattr(torch, "compile", spy)
    rows = bench.run([("smoke", bench._smoke_config())], ["fp16"], [False, True], 0, 2, 1, 1, smoke=True)
    assert [r.compile for r in rows] == [False, True] and len(compiled) == 1  # only the compile=True run
    assert all(r.samples_per_s > 0 and 0 <= r.wait_share <= 1 for r in rows)
    out = capsys.readouterr().out
    assert len(re.findall(r"train smoke fp16 compile=(?:off|on) .*samples/s", out)) == 2
    m = re.search(r"kernel smoke: ([\d.]+) slices/s end to end", out)
    assert m and float(m.group(1)) > 0
    assert "projected (estimate) smoke" in out and "h for 5 folds" in out
