"""Shared, session-scoped fixtures: one small phantom, its metadata and its JPEG cache, built once
per test worker in a temporary folder (never in the repository's work/)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

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
