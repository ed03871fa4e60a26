"""Shared, session-scoped fixtures: one small phantom, its metadata and its JPEG cache, built once
per test worker in a temporary folder (never in the repository's work/)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pe import paths

SMALL_PHANTOM = dict(train_studies=10, test_studies=3, seed=123, size=128, min_slices=16, max_slices=32)


@pytest.fixture(autouse=True)
def _isolated_paths(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may write into the repository's work/, oof/, submissions/ or reports/."""
    base = tmp_path_factory.getbasetemp() / "pe_roots"
    for var, sub in [("PE_WORK_DIR", "work"), ("PE_OOF_DIR", "oof"),
                     ("PE_SUBMISSIONS_DIR", "submissions"), ("PE_REPORTS_DIR", "reports")]:
        monkeypatch.setenv(var, str(base / sub))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small RSPECT look-alike (src/00_make_phantom.py logic) at 128 px."""
    from pe.synthetic.phantom import make_phantom

    out = tmp_path_factory.mktemp("phantom")
    make_phantom(out, **SMALL_PHANTOM)
    return out


@pytest.fixture(scope="session")
def phantom_meta(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Metadata parquet per split for :func:`phantom_dir`."""
    from pe.data.metadata import parse_metadata

    out = tmp_path_factory.mktemp("meta")
    paths = {}
    for split in ("train", "test"):
        paths[split] = out / f"{split}.parquet"
        parse_metadata(phantom_dir, split, paths[split], workers=1)
    return paths


@pytest.fixture(scope="session")
def phantom_cache(phantom_meta: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3-window JPEG cache (128 px) of both splits of :func:`phantom_dir`."""
    from pe.data.cache import cache_images

    out = tmp_path_factory.mktemp("cache")
    for split in ("train", "test"):
        cache_images(phantom_meta[split], out, size=128, workers=1)
    return out


def _load_script(name: str) -> ModuleType:
    """Import a numbered script (``src/NN_name.py``: not importable by name) as a module."""
    path = paths.REPO_ROOT / "src" / name
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), path)
    assert spec and spec.loader, path
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def load_script() -> Callable[[str], ModuleType]:
    """``load_script("09_score.py").main([...])`` runs a numbered script in-process."""
    return _load_script


def _copy_meta(meta: dict[str, Path]) -> None:
    """Each split's metadata parquet in ``meta`` copied to where the stages read it (``paths.meta_path``)."""
    for split, src in meta.items():
        paths.meta_path(split).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, paths.meta_path(split))


@contextmanager
def _chain_env(root: Path, data_dir: Path, meta: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """Inside the block: the PE_* folders under ``root`` (data from ``data_dir``), each split's metadata
    in ``meta`` copied to where the stages read it, torch on one thread (restored after). Yields the
    environment it set. For session fixtures that run a pipeline chain (monkeypatch is per test)."""
    import torch

    env = {"PE_DATA_DIR": data_dir, "PE_WORK_DIR": root / "work", "PE_OOF_DIR": root / "oof",
           "PE_SUBMISSIONS_DIR": root / "submissions", "PE_REPORTS_DIR": root / "reports"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, str(v))
            _copy_meta(meta)
            yield env
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def chain_env() -> Callable[..., Any]:
    """``with chain_env(root, phantom_dir, phantom_meta) as env:`` runs stages in a temporary pipeline root."""
    return _chain_env


def _untrained_cnn_runs(exp: str, cfg: Any, phantom_meta: dict[str, Path], folds: tuple[int, ...] = (0, 1),
                        seed: int = 0) -> dict[int, list[str]]:
    """What stage 05 reads, without training: the phantom's metadata in work/meta, a 2-fold folds.csv
    (the sorted studies alternating) and ``best.pt`` of an untrained CNN ``cfg`` (torch seed ``seed + k``,
    so the folds' weights differ) for each fold ``k`` in ``folds``. Returns {0: studies, 1: studies}."""
    import pandas as pd
    import torch

    from pe.config import to_dict
    from pe.models.slice_cnn import build_model
    from pe.rspect import STUDY

    _copy_meta(phantom_meta)
    studies = sorted(pd.read_parquet(phantom_meta["train"])[STUDY].unique())
    split = {0: studies[0::2], 1: studies[1::2]}
    pd.DataFrame({STUDY: studies, "fold": [i % 2 for i in range(len(studies))]}).to_csv(paths.folds_path(),
                                                                                      index=False)
    for k in folds:
        torch.manual_seed(seed + k)
        run = paths.run_dir(exp, k)
        run.mkdir(parents=True, exist_ok=True)
        torch.save({"model": build_model(cfg).state_dict(), "config": to_dict(cfg), "epoch": 0}, run / "best.pt")
    return split


@pytest.fixture(scope="session")
def untrained_cnn_runs() -> Callable[..., dict[int, list[str]]]:
    """``untrained_cnn_runs(exp, cfg, phantom_meta, folds, seed)``: see :func:`_untrained_cnn_runs`."""
    return _untrained_cnn_runs


def _run_with_stand_in(script: Path, tmp_path: Path, args: list[str], env: dict[str, str],
                       on_call: str = "") -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run the bash ``script`` with PY = a stand-in interpreter that records each call's arguments
    (tab-separated, one call per line) instead of running Python, then runs the bash snippet ``on_call``
    (``$1`` is the script it was given). Returns the process and the recorded calls."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\t" "$@" >> "{log}"\necho >> "{log}"\n{on_call}\n')
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(script), *args], env={**os.environ, "PY": str(fake), **env},
                          capture_output=True, text=True, timeout=60)
    calls = [line.rstrip("\t").split("\t") for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


@pytest.fixture(scope="session")
def run_with_stand_in() -> Callable[..., tuple[subprocess.CompletedProcess, list[list[str]]]]:
    """``run_with_stand_in(script, tmp_path, args, env, on_call="")``: see :func:`_run_with_stand_in`."""
    return _run_with_stand_in
