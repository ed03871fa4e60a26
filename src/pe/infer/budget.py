"""The kernel's time budget: the fold-model fallback ladder and the projection of the total run time
from the studies done so far (:class:`Budget`), used by :mod:`pe.infer.kernel`."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

KAGGLE_LIMIT_HOURS = 9.0


def fold_levels(folds: Sequence[int]) -> list[list[int]]:
    """The fallback ladder: all folds, then half of them, then one (distinct levels only)."""
    levels: list[list[int]] = []
    for n in (len(folds), math.ceil(len(folds) / 2), 1):
        if not levels or n < len(levels[-1]):
            levels.append(list(folds[:n]))
    return levels


class Budget:
    """Projects the total run time and picks the fold level that keeps it within the budget."""

    def __init__(self, budget_s: float, total_slices: int, levels: list[list[int]], probe: int, t_start: float):
        self.budget_s, self.total, self.levels, self.probe, self.t0 = budget_s, total_slices, levels, probe, t_start
        self.level = 0
        self.done_slices = 0
        self.done_studies = 0
        self.model_s_per_fold_slice: list[float] = []
        self.other_s = 0.0  # time not spent in the models (waiting for decoding, blending)
        self.announced = False

    def record(self, n_slices: int, n_folds: int, model_s: float, other_s: float) -> None:
        self.done_slices += n_slices
        self.done_studies += 1
        self.other_s += other_s
        if n_slices:
            self.model_s_per_fold_slice.append(model_s / (n_slices * n_folds))

    def projected_total(self, n_folds: int) -> float:
        """Elapsed + remaining slices × (model time per slice at ``n_folds`` + other time per slice)."""
        elapsed = time.perf_counter() - self.t0
        if not self.done_slices:
            return elapsed
        per_fold = float(np.median(self.model_s_per_fold_slice)) if self.model_s_per_fold_slice else 0.0
        other = self.other_s / self.done_slices
        return elapsed + (self.total - self.done_slices) * (per_fold * n_folds + other)

    def update(self, log: Any) -> list[int]:
        """Folds to use for the next study (may step down the ladder, never up)."""
        if self.done_studies < self.probe:
            return self.levels[self.level]
        proj = self.projected_total(len(self.levels[self.level]))
        if not self.announced:
            log(f"projected total {proj / 3600:.2f} h ({proj / 60:.1f} min) for {self.total} slices with "
                f"{len(self.levels[self.level])} "
                f"fold model(s) (budget {self.budget_s / 3600:.2f} h, Kaggle limit {KAGGLE_LIMIT_HOURS:.0f} h)")
            self.announced = True
        while proj > self.budget_s and self.level + 1 < len(self.levels):
            self.level += 1
            proj = self.projected_total(len(self.levels[self.level]))
            log(f"over budget: falling back to {len(self.levels[self.level])} fold model(s) "
                f"{self.levels[self.level]}; projected total now {proj / 3600:.2f} h")
        return self.levels[self.level]
