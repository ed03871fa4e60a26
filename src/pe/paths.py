"""Every location the pipeline reads or writes, resolved from the repository root with
environment-variable overrides. Nothing depends on the working directory.

| variable              | default                  | holds                                        |
|-----------------------|--------------------------|----------------------------------------------|
| PE_DATA_DIR           | <repo>/input/phantom     | train/, test/, train.csv, test.csv (Kaggle)  |
| PE_WORK_DIR           | <repo>/work              | meta/, cache/, folds.csv, models/, embeddings/ |
| PE_OOF_DIR            | <repo>/oof               | out-of-fold and test predictions per experiment |
| PE_SUBMISSIONS_DIR    | <repo>/submissions       | submission CSVs                              |
| PE_REPORTS_DIR        | <repo>/reports           | HTML reports                                 |

On Kaggle: ``PE_DATA_DIR=/kaggle/input/rsna-str-pulmonary-embolism-detection``; locally with the
real data: ``PE_DATA_DIR=input/rsna-str-pulmonary-embolism-detection``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT: Path = Path(__file__).resolve().parents[2]
CONFIGS_DIR: Path = REPO_ROOT / "src" / "configs"


def _env_path(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else default


def data_dir() -> Path:
    """Competition data root (train/, test/, train.csv, test.csv)."""
    return _env_path("PE_DATA_DIR", REPO_ROOT / "input" / "phantom")


def work_dir() -> Path:
    """Root for everything derived and large: metadata, caches, models, embeddings."""
    return _env_path("PE_WORK_DIR", REPO_ROOT / "work")


def oof_dir() -> Path:
    return _env_path("PE_OOF_DIR", REPO_ROOT / "oof")


def submissions_dir() -> Path:
    return _env_path("PE_SUBMISSIONS_DIR", REPO_ROOT / "submissions")


def reports_dir() -> Path:
    return _env_path("PE_REPORTS_DIR", REPO_ROOT / "reports")


def meta_path(split: str) -> Path:
    """Parsed metadata table of a split (written by src/01_parse_metadata.py)."""
    return work_dir() / "meta" / f"{split}.parquet"


def cache_dir(size: int = 512) -> Path:
    """3-window JPEG cache at a given size (written by src/02_cache_images.py)."""
    return work_dir() / "cache" / f"jpeg{size}"


def folds_path() -> Path:
    return work_dir() / "folds.csv"


def models_dir() -> Path:
    return work_dir() / "models"


def run_dir(exp: str, fold: int) -> Path:
    """Run folder of one experiment and fold: ``work/models/<exp>/fold<k>`` (fold -1 = full fit)."""
    return models_dir() / exp / f"fold{fold}"


def embeddings_dir(exp: str, fold: int, split: str) -> Path:
    return work_dir() / "embeddings" / exp / f"fold{fold}" / split


def exp_oof_dir(exp: str) -> Path:
    return oof_dir() / exp


def cnn_oof_path(exp: str, fold: int) -> Path:
    """Stage 04's out-of-fold slice probabilities of one fold: ``oof/<exp>/cnn_fold<k>.parquet``."""
    return exp_oof_dir(exp) / f"cnn_fold{fold}.parquet"
