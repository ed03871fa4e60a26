"""The report's figures (matplotlib Agg; PNG files only, no display on servers or Kaggle)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Rectangle
from sklearn.metrics import roc_auc_score, roc_curve

from pe.explain.pointing import boxes_mask, map_peak
from pe.io import atomic_path  # noqa: E402
from pe.report.evaluation import NEG_INDEX, Evaluation, ExplainedSlice
from pe.rspect import EXAM_LABELS  # noqa: E402


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Σ_b (n_b / N) |mean(y)_b − mean(p)_b| over equal-width probability bins."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    if len(y) == 0:
        return float("nan")
    b = np.minimum((p * n_bins).astype(int), n_bins - 1)
    n = np.bincount(b, minlength=n_bins)
    gap = np.abs(np.bincount(b, weights=y, minlength=n_bins) - np.bincount(b, weights=p, minlength=n_bins))
    return float(gap.sum() / n.sum())


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
def save_figure(fig: plt.Figure, path: Path) -> None:
    """Save a PNG atomically and close the figure."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_roc(ev: Evaluation, path: Path) -> dict[str, float]:
    """ROC curves: (a) image level and study-level PE, (b) each exam label. Returns the AUCs drawn."""

    s = ev.scorer
    curves_a = [("image (pe_present_on_image)", s.image_truth, ev.image_probs),
                ("study PE (1 - P(negative))", s.q > 0, 1.0 - ev.exam_probs[:, NEG_INDEX])]
    curves_b = [(label, s.exam_truth[:, j], ev.exam_probs[:, j]) for j, label in enumerate(EXAM_LABELS)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    aucs: dict[str, float] = {}
    for ax, curves, title in ((axes[0], curves_a, "(a) image and study-level PE"),
                              (axes[1], curves_b, "(b) exam labels")):
        for name, y, p in curves:
            y = np.asarray(y) > 0.5
            if y.all() or not y.any():
                ax.plot([], [], " ", label=f"{name}: one class only")
                continue
            fpr, tpr, _ = roc_curve(y, p)
            aucs[name] = float(roc_auc_score(y, p))
            ax.plot(fpr, tpr, lw=1.5, label=f"{name}: AUC {aucs[name]:.3f} (n+ {int(y.sum())})")
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)
    return aucs


def plot_calibration(ev: Evaluation, path: Path, n_bins: int = 10) -> dict[str, float]:
    """Reliability diagrams for slice probabilities, pooled exam-label probabilities and study PE,
    with a histogram of the predictions; returns the expected calibration error of each."""
    s = ev.scorer
    sets = [("slices (pe_present_on_image)", s.image_truth, ev.image_probs),
            ("exam labels (all nine pooled)", s.exam_truth.ravel(), ev.exam_probs.ravel()),
            ("study PE (1 - P(negative))", (s.q > 0).astype(float), 1.0 - ev.exam_probs[:, NEG_INDEX])]
    fig, axes = plt.subplots(2, 3, figsize=(14, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    ece: dict[str, float] = {}
    edges = np.linspace(0, 1, n_bins + 1)
    for j, (name, y, p) in enumerate(sets):
        y, p = np.asarray(y, float), np.clip(np.asarray(p, float), 0, 1)
        b = np.minimum((p * n_bins).astype(int), n_bins - 1)
        n = np.bincount(b, minlength=n_bins)
        ok = n > 0
        mean_p = np.bincount(b, weights=p, minlength=n_bins)[ok] / n[ok]
        frac = np.bincount(b, weights=y, minlength=n_bins)[ok] / n[ok]
        ece[name] = expected_calibration_error(y, p, n_bins)
        ax = axes[0, j]
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
        ax.plot(mean_p, frac, "o-", label=f"observed (ECE {ece[name]:.3f})")
        ax.set(title=name, ylabel="observed frequency", xlim=(0, 1), ylim=(-0.02, 1.02))
        ax.legend(fontsize=8, loc="upper left")
        axes[1, j].hist(p, bins=edges, color="tab:blue", alpha=0.7, log=True)
        axes[1, j].set(xlabel="predicted probability", ylabel="count")
    save_figure(fig, path)
    return ece


def plot_slice_curves(ev: Evaluation, losses: np.ndarray, chosen: Sequence[tuple[int, str]],
                      order: pd.Series, cnn_probs: pd.Series | None, path: Path) -> list[dict[str, Any]]:
    """One panel per chosen study: predicted slice probabilities (final, and the CNN's when given)
    against the true slice labels, in z order. Returns a description row per panel."""
    s = ev.scorer
    rows = []
    fig, axes = plt.subplots(len(chosen), 1, figsize=(11, 2.2 * len(chosen) + 0.5), squeeze=False,
                             constrained_layout=True)
    for ax, (i, kind) in zip(axes[:, 0], chosen, strict=True):
        sel = np.flatnonzero(s.image_study == i)
        sops = s.image_ids[sel]
        pos = order.reindex(sops).to_numpy(dtype=float)
        if np.isnan(pos).any():  # slice order unknown for some slices: keep the truth row order
            pos = np.arange(len(sel), dtype=float)
        z = np.argsort(pos, kind="stable")
        x = np.arange(len(sel))
        ax.fill_between(x, s.image_truth[sel][z], step="mid", color="tab:green", alpha=0.3, label="true slice label")
        ax.plot(x, ev.image_probs[sel][z], color="tab:blue", lw=1.5, label="final P(PE on slice)")
        if cnn_probs is not None:
            cp = cnn_probs.reindex(sops).to_numpy(dtype=float)[z]
            if np.isfinite(cp).any():
                ax.plot(x, cp, color="tab:orange", lw=1, alpha=0.8, label="CNN P(PE on slice)")
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        pe_truth = bool(s.q[i] > 0)
        p_pe = 1.0 - float(ev.exam_probs[i, NEG_INDEX])
        study = str(s.study_ids[i])
        ax.set_title(f"{kind}: {study}  loss {losses[i]:.4f}  truth {'PE' if pe_truth else 'no PE'}  "
                     f"P(PE exam) {p_pe:.2f}", fontsize=9)
        ax.set(ylim=(-0.03, 1.03), xlim=(0, max(len(sel) - 1, 1)), ylabel="P")
        rows.append(dict(kind=kind, study=study, loss=float(losses[i]), n_slices=len(sel),
                         truth_pe=pe_truth, p_pe_exam=p_pe))
    axes[-1, 0].set_xlabel("slice (z order)")
    axes[0, 0].legend(fontsize=8, loc="upper right")
    save_figure(fig, path)
    return rows


def plot_maps(slices: Sequence[ExplainedSlice], path: Path, per_row: int = 4) -> None:
    """Grad-CAM (and IG when present) overlaid on the PE-window channel, true boxes in green, the map
    peak as a white cross."""


    has_ig = any(s.ig is not None for s in slices)
    kinds = [("PE window", None), ("Grad-CAM", "cam")] + ([("IG", "ig")] if has_ig else [])
    n_groups = math.ceil(len(slices) / per_row)
    fig, axes = plt.subplots(n_groups * len(kinds), per_row, figsize=(3.2 * per_row, 3.4 * n_groups * len(kinds)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, s in enumerate(slices):
        for j, (name, attr) in enumerate(kinds):
            m = None if attr is None else getattr(s, attr)
            if attr is not None and m is None:
                continue
            ax = axes[(k // per_row) * len(kinds) + j, k % per_row]
            ax.imshow(s.image, cmap="gray")
            boxed = s.boxes is not None and len(s.boxes) > 0
            if boxed:
                for x0, y0, x1, y1 in s.boxes:
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.2))
            if m is None:
                ax.set_title(f"{name}, fold {s.fold} model, p={s.prob:.2f}\n{s.study[-12:]} / {s.sop[-12:]}",
                             fontsize=8)
                continue
            ax.imshow(m, cmap="jet", alpha=0.4, vmin=0, vmax=1)
            peak = map_peak(m)
            hit = ""
            if boxed:
                hit = " hit" if peak is not None and boxes_mask(m.shape, s.boxes)[peak] else " miss"
            if peak is not None:
                ax.plot(peak[1], peak[0], "wx", ms=8, mew=2)
            ax.set_title(f"{name}{hit}", fontsize=8)
    save_figure(fig, path)
