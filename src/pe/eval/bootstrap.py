"""Percentile bootstrap intervals over studies, for any statistic of per-study rows.

Studies are the unit of resampling (slices and emboli of one study are not independent). The
statistic receives the resampled *rows* (m, k), so ratio statistics built from pooled sums work:
e.g. F1 from summed (TP, FP, FN) is ``lambda r: 2*r[:,0].sum() / (2*r[:,0].sum()+r[:,1].sum()+r[:,2].sum())``
— resampling per-study F1 values and averaging would give a different (study-averaged) quantity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BootstrapCI:
    estimate: float
    low: float
    high: float
    n_boot: int
    n_valid: int  # resamples where the statistic was defined (not NaN)

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(
    values_per_study: np.ndarray,
    statistic: Callable[[np.ndarray], float],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BootstrapCI:
    """Point estimate ``statistic(values)`` and the (alpha/2, 1-alpha/2) percentile interval of the
    statistic over ``n_boot`` resamples of the studies (rows of ``values_per_study``, shape (n,) or
    (n, k)) drawn with replacement. Resamples where the statistic is NaN (e.g. no predictions, so
    PPV is undefined) are left out of the percentiles; their count is reported as ``n_valid``."""
    values = np.asarray(values_per_study)
    if values.ndim not in (1, 2) or len(values) == 0:
        raise ValueError(f"values_per_study must be a non-empty (n,) or (n, k) array, got shape {values.shape}")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    estimate = float(statistic(values))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    stats = np.array([float(statistic(values[i])) for i in idx])
    valid = stats[~np.isnan(stats)]
    if len(valid) == 0:
        return BootstrapCI(estimate, float("nan"), float("nan"), n_boot, 0)
    low, high = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(estimate, float(low), float(high), n_boot, int(len(valid)))
