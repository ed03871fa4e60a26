"""An offline HTML report of one experiment's out-of-fold predictions, with explanation maps.

``build_report(exp, out_dir, ...)`` (used by ``src/10_report.py``) writes ``out_dir/index.html``,
its PNGs (matplotlib Agg, relative links: the folder opens offline anywhere) and ``report.json``
(every number in the tables). Sections:

1. The OOF metric per label (loss contribution, weight share, AUC) for the raw predictions, after
   the hierarchy repair (:func:`pe.hierarchy.repair_long`) and for the prior baseline
   (:func:`pe.metric.prior_predictions`); the numbers are :func:`pe.metric.score_breakdown`'s, the
   same that ``src/09_score.py`` prints.
2. Sensitivity / specificity / PPV / NPV / F1 at 0.5 for exam-level PE and for images
   (papers/condrea2023_anatomically_aware_dual_hop.txt, Table IV).
3. ROC curves: image level, study-level PE and each exam label (papers/suman2021… Fig. 3).
4. Reliability (calibration) diagrams for slice and exam probabilities, with the expected
   calibration error.
5. Slice-probability curves against the true slice labels for the best PE-positive and the worst
   studies by their own weighted log loss (papers/condrea2023… Fig. 7), with the stage-1 CNN's slice
   probabilities beside the final ones when available.
6. Grad-CAM (papers/shi2020… eqs. 1–2) on the most confident true-positive slices, overlaid on the
   PE-window channel, optionally integrated gradients (papers/condrea2024…), and — where embolus
   boxes are known (the phantom's ``train_boxes.csv``) — the pointing game against its chance rate.
   Each study is explained by the fold model that did not train on it (its validation fold).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or Kaggle
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from pe import metric, paths, rspect  # noqa: E402
from pe.io import atomic_path, write_json_atomic, write_text_atomic  # noqa: E402
from pe.rspect import EXAM_LABELS, ID_COLUMNS, IMAGE_LABEL, SOP, STUDY  # noqa: E402

log = logging.getLogger(__name__)

_EXAM_W = np.asarray(rspect.EXAM_WEIGHT_VECTOR, dtype=np.float64)
_NEG = EXAM_LABELS.index("negative_exam_for_pe")
STAT_KEYS: tuple[str, ...] = ("sensitivity", "specificity", "ppv", "npv", "f1")


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def load_predictions(exp: str) -> pd.DataFrame:
    """OOF predictions of an experiment: ``oof/<exp>/oof.csv`` (an ensemble) or the union of
    ``oof/<exp>/fold<k>.csv`` (a sequence model). Each id must appear once."""
    d = paths.exp_oof_dir(exp)
    files = [d / "oof.csv"] if (d / "oof.csv").is_file() else sorted(d.glob("fold[0-9]*.csv"))
    if not files:
        raise FileNotFoundError(f"{d}: no oof.csv and no fold<k>.csv OOF prediction files")
    parts = []
    for f in files:
        df = pd.read_csv(f, dtype={"id": str})
        if list(df.columns) != list(rspect.SUBMISSION_COLUMNS):
            raise ValueError(f"{f}: expected columns id,label, got {list(df.columns)}")
        parts.append(df)
    pred = pd.concat(parts, ignore_index=True)
    dup = pred["id"].duplicated()
    if dup.any():
        raise ValueError(f"{d}: {int(dup.sum())} ids appear more than once across {[f.name for f in files]}, "
                         f"e.g. {pred.loc[dup, 'id'].iloc[0]}")
    return pred


def load_truth(path: str | Path | None = None) -> pd.DataFrame:
    """train.csv-shaped truth (default ``<data_dir>/train.csv``)."""
    p = Path(path) if path is not None else paths.data_dir() / "train.csv"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: truth file (train.csv) not found")
    truth = pd.read_csv(p, dtype={c: str for c in ID_COLUMNS})
    missing = [c for c in (STUDY, SOP, IMAGE_LABEL, *EXAM_LABELS) if c not in truth.columns]
    if missing:
        raise ValueError(f"{p}: missing columns {missing}")
    return truth


def resolve_cnn_exp(exp: str, default: str = "demo") -> str:
    """The stage-1 CNN experiment behind ``exp``: ``cnn_exp`` of its (first) sequence-model config,
    looking through an ensemble's ``weights.json`` members; ``default`` when nothing says."""
    candidates = [exp]
    wfile = paths.exp_oof_dir(exp) / "weights.json"
    if wfile.is_file():
        try:
            candidates = list(json.loads(wfile.read_text()).get("members", [])) + candidates
        except (ValueError, AttributeError):
            pass
    for name in candidates:
        for cfg_file in sorted((paths.models_dir() / name).glob("fold*/config.yaml")):
            try:
                value = (yaml.safe_load(cfg_file.read_text()) or {}).get("cnn_exp")
            except yaml.YAMLError:
                value = None
            if value:
                return str(value)
    return default


def load_slice_order(truth: pd.DataFrame) -> pd.Series:
    """Slice position (0..n-1 in z order) per SOPInstanceUID: from the metadata table
    (``work/meta/train.parquet``) when present, else train.csv's row order within each study."""
    meta = paths.meta_path("train")
    if meta.is_file():
        m = pd.read_parquet(meta, columns=[SOP, "slice_index"])
        return m.set_index(SOP)["slice_index"]
    log.warning("%s not found: slice order taken from train.csv row order", meta)
    return pd.Series(truth.groupby(STUDY).cumcount().to_numpy(), index=truth[SOP].to_numpy())


def load_cnn_slice_probs(cnn_exp: str) -> pd.Series | None:
    """Stage-1 OOF slice probabilities per SOPInstanceUID (``oof/<cnn_exp>/cnn_fold<k>.parquet``)."""
    files = sorted(paths.exp_oof_dir(cnn_exp).glob("cnn_fold[0-9]*.parquet"))
    if not files:
        return None
    df = pd.concat([pd.read_parquet(f, columns=[SOP, "prob"]) for f in files], ignore_index=True)
    return df.drop_duplicates(SOP).set_index(SOP)["prob"]


# ------------------------------------------------------------------------------------------------
# Numbers
# ------------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Scorer-aligned arrays and breakdowns of one prediction set against the truth."""

    scorer: metric.Scorer
    image_probs: np.ndarray
    exam_probs: np.ndarray
    breakdowns: dict[str, dict[str, Any]] = field(default_factory=dict)
    repair_report: Any = None


def per_study_loss(scorer: metric.Scorer, image_probs: np.ndarray, exam_probs: np.ndarray) -> np.ndarray:
    """Each study's own weighted log loss (the metric restricted to that study's rows)."""
    ib = metric.bce(scorer.image_truth, image_probs) * scorer.image_weight
    num = np.bincount(scorer.image_study, weights=ib, minlength=scorer.n_studies)
    num += metric.bce(scorer.exam_truth, exam_probs) @ _EXAM_W
    den = np.bincount(scorer.image_study, weights=scorer.image_weight, minlength=scorer.n_studies) + _EXAM_W.sum()
    return num / den


def evaluate(pred: pd.DataFrame, truth: pd.DataFrame, prior: bool = True, repair: bool = True) -> Evaluation:
    """Breakdowns of ``pred`` ("oof"), of its hierarchy repair ("repaired") and of the prior baseline
    ("prior", training label means over all of ``truth``) on the studies ``pred`` covers."""
    scorer, ip, ep = metric.scorer_for(pred, truth)
    ev = Evaluation(scorer, ip, ep)
    ev.breakdowns["oof"] = metric.breakdown_arrays(scorer, ip, ep)
    ids = truth.loc[truth[STUDY].isin(pd.Index(scorer.study_ids)), list(ID_COLUMNS)]
    if repair:
        from pe.hierarchy import repair_long

        fixed, ev.repair_report = repair_long(pred, ids)
        ev.breakdowns["repaired"] = metric.score_breakdown(fixed, truth)
    if prior:
        ev.breakdowns["prior"] = metric.score_breakdown(metric.prior_predictions(truth, ids), truth)
    return ev


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
    from sklearn.metrics import roc_auc_score, roc_curve

    s = ev.scorer
    curves_a = [("image (pe_present_on_image)", s.image_truth, ev.image_probs),
                ("study PE (1 - P(negative))", s.q > 0, 1.0 - ev.exam_probs[:, _NEG])]
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
            ("study PE (1 - P(negative))", (s.q > 0).astype(float), 1.0 - ev.exam_probs[:, _NEG])]
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


def choose_studies(ev: Evaluation, losses: np.ndarray, n: int) -> list[tuple[int, str]]:
    """Indices (into scorer studies) of the best PE-positive studies and the worst studies by loss,
    ``n`` in all (half each), as (index, "best"|"worst"), without repeats."""
    order = np.argsort(losses, kind="stable")
    pe = ev.scorer.q > 0
    n_best = n // 2 if pe.any() else 0
    best = [int(i) for i in order if pe[i]][:n_best]
    worst = [int(i) for i in order[::-1] if int(i) not in best][: n - len(best)]
    return [(i, "best") for i in best] + [(i, "worst") for i in worst]


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
        p_pe = 1.0 - float(ev.exam_probs[i, _NEG])
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


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------
def fmt(v: Any, digits: int = 6) -> str:
    """Table cell text: floats with ``digits`` decimals, NaN as "n/a"."""
    if isinstance(v, (float, np.floating)):
        return "n/a" if not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
    return html.escape(str(v))


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str = "", digits: int = 6) -> str:
    tid = f' id="{table_id}"' if table_id else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{fmt(c, digits)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{tid}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def metric_table(breakdowns: dict[str, dict[str, Any]]) -> str:
    """Per label: weight share, then loss contribution and AUC for each prediction set; last row the
    total score."""
    sets = list(breakdowns)
    header = ["label", "weight"] + [f"{h} ({s})" for s in sets for h in ("loss", "AUC")]
    first = breakdowns[sets[0]]
    rows: list[list[Any]] = []
    for label in first["labels"]:
        row: list[Any] = [label, first["labels"][label]["weight"]]
        for s in sets:
            v = breakdowns[s]["labels"][label]
            row += [v["loss"], v["auc"]]
        rows.append(row)
    total: list[Any] = ["score (total)", 1.0]
    for s in sets:
        total += [breakdowns[s]["score"], ""]
    rows.append(total)
    return html_table(header, rows, table_id="metric-table")


def stats_table(breakdowns: dict[str, dict[str, Any]]) -> str:
    rows = []
    for s, bd in breakdowns.items():
        for level, key in (("exam PE", "exam_pe_at_0.5"), ("image", "image_at_0.5")):
            st = bd[key]
            rows.append([s, level, *[st[k] for k in STAT_KEYS], f"{st['tp']}/{st['fp']}/{st['tn']}/{st['fn']}"])
        rows.append([s, "AUC (study PE / image)", bd["study_pe_auc"], bd["image_auc"], "", "", "", ""])
    return html_table(["predictions", "level", "sensitivity", "specificity", "PPV", "NPV", "F1", "tp/fp/tn/fn"],
                      rows, table_id="stats-table")


_CSS = """body{font-family:sans-serif;max-width:1250px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#eee}img{max-width:100%;border:1px solid #ddd}
.note{color:#555;font-size:13px}pre{background:#f6f6f6;padding:8px}"""


def write_html(path: Path, title: str, sections: Sequence[tuple[str, str]]) -> None:
    body = "\n".join(f"<h2>{html.escape(h)}</h2>\n{content}" for h, content in sections)
    doc = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
    write_text_atomic(path, doc)


def img(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


# ------------------------------------------------------------------------------------------------
# Explanation maps (stage-1 CNN)
# ------------------------------------------------------------------------------------------------
@dataclass
class ExplainedSlice:
    """One explained slice: the PE-window channel the model saw, its maps and the true boxes, all in
    the model input frame."""

    sop: str
    study: str
    fold: int
    prob: float
    image: np.ndarray  # (H, W) PE-window (G) channel of the centre slice, as fed to the model
    cam: np.ndarray  # (H, W) Grad-CAM in [0, 1]
    ig: np.ndarray | None = None  # (H, W) integrated gradients in [0, 1]
    boxes: np.ndarray | None = None  # (m, 4) x0, y0, x1, y1 in input pixels; None when unknown
    logit_drop: float | None = None  # PE logit minus the logit with the emboli filled in (fill_boxes)


def load_embolus_boxes(data_dir: Path | None = None) -> pd.DataFrame | None:
    """``<data_dir>/train_boxes.csv`` (SOPInstanceUID, x, y, width, height in original pixels), or None
    when the data has no box annotations (the real RSPECT training set ships none)."""
    p = (data_dir or paths.data_dir()) / "train_boxes.csv"
    if not p.is_file():
        return None
    df = pd.read_csv(p, dtype={SOP: str})
    missing = [c for c in (SOP, "x", "y", "width", "height") if c not in df.columns]
    if missing:
        raise ValueError(f"{p}: missing columns {missing}")
    return df


def original_shapes() -> pd.DataFrame | None:
    """(rows, columns) of the original DICOM per SOPInstanceUID from the train metadata table."""
    meta = paths.meta_path("train")
    if not meta.is_file():
        return None
    return pd.read_parquet(meta, columns=[SOP, "rows", "columns"]).set_index(SOP)


def cnn_oof_folds(cnn_exp: str) -> pd.Series | None:
    """Validation fold per study as the CNN's own OOF files record it: a study in
    ``oof/<cnn_exp>/cnn_fold<k>.parquet`` was predicted by fold k's model, which did not train on it."""
    parts = []
    for f in sorted(paths.exp_oof_dir(cnn_exp).glob("cnn_fold[0-9]*.parquet")):
        m = re.fullmatch(r"cnn_fold(\d+)\.parquet", f.name)
        if m:
            studies = pd.read_parquet(f, columns=[STUDY])[STUDY].astype(str).unique()
            parts.append(pd.Series(int(m.group(1)), index=studies))
    if not parts:
        return None
    out = pd.concat(parts)
    dup = out.index[out.index.duplicated()]
    if len(dup):
        raise ValueError(f"{paths.exp_oof_dir(cnn_exp)}: study {dup[0]} is in the OOF files of two folds")
    return out


def study_folds() -> pd.Series | None:
    """Validation fold per study (``work/folds.csv``)."""
    p = paths.folds_path()
    if not p.is_file():
        return None
    from pe.folds import load_folds

    f = load_folds(p)
    return f.set_index(STUDY)["fold"].astype(int)


def explain_slices(cnn_exp: str, targets: pd.DataFrame, fold_of: pd.Series,
                   boxes: pd.DataFrame | None, shapes: pd.DataFrame | None, ig: bool = False,
                   ig_steps: int = 32, device: str = "cpu", batch_size: int = 16,
                   cam_layer: str | None = None) -> list[ExplainedSlice]:
    """Grad-CAM (and optionally integrated gradients) for ``targets`` (columns SOPInstanceUID,
    StudyInstanceUID, prob). Each study is explained by the model of its own validation fold
    (``work/models/<cnn_exp>/fold<k>/best.pt``), so no map comes from a model that saw the study.
    ``cam_layer``: dotted name of the module whose output Grad-CAM uses (default the model's
    ``gradcam_layer``, the last feature map; an earlier block gives finer but less semantic maps)."""
    import torch
    from tqdm import tqdm

    from pe.cache import load_boxes, load_index, load_study_images
    from pe.cnn import load_cnn, preprocess_study, resolve_paths
    from pe.data import clip_box
    from pe.explain import boxes_to_input_frame, fill_boxes, grad_cam, integrated_gradients, logit_of

    dev = torch.device(device)
    out: list[ExplainedSlice] = []
    targets = targets.assign(fold=targets[STUDY].map(fold_of)).dropna(subset=["fold"])
    by_box = None if boxes is None else {k: g[["x", "y", "width", "height"]].to_numpy(float)
                                         for k, g in boxes.groupby(SOP)}
    for fold, tf in sorted(targets.groupby("fold"), key=lambda kv: kv[0]):
        fold = int(fold)
        ckpt = paths.run_dir(cnn_exp, fold) / "best.pt"
        if not ckpt.is_file():
            log.warning("%s not found: fold %d slices not explained", ckpt, fold)
            continue
        try:
            model, cfg = load_cnn(ckpt, dev)
        except Exception as e:  # name the file: torch's messages do not
            raise RuntimeError(f"{ckpt}: cannot load the CNN checkpoint: {type(e).__name__}: {e}") from e
        model.eval()
        if cam_layer:
            try:
                layer = model.get_submodule(cam_layer)
            except AttributeError as e:
                names = [n for n, _ in model.named_modules() if n.count(".") <= 2][:40]
                raise ValueError(f"{ckpt}: no module {cam_layer!r} in the CNN; e.g. {names}") from e
        else:
            layer = getattr(model, "gradcam_layer", None)
        if layer is None:
            raise AttributeError(f"{ckpt}: the CNN has no gradcam_layer attribute")
        cache_dir = resolve_paths(cfg)[0]
        cindex = load_index(cache_dir)
        crop_boxes = {}
        if getattr(cfg, "crop_lung", False):
            crop_boxes = {str(r[STUDY]): (int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"]))
                          for r in load_boxes(cache_dir).to_dict("records")}
        centre = 3 * int(getattr(cfg, "neighbors", 0)) + 1  # G (PE window) of the centre slice
        for study, ts in tqdm(tf.groupby(STUDY), desc=f"explain {cnn_exp}/fold{fold}", leave=False):
            study = str(study)
            ci = cindex[cindex[STUDY] == study].sort_values("slice_index")
            pos = pd.Series(np.arange(len(ci)), index=ci[SOP].astype(str).to_numpy())
            rows = pos.reindex(ts[SOP].astype(str)).to_numpy()
            if np.isnan(rows.astype(float)).any():
                raise ValueError(f"{cache_dir}/index.parquet: some slices of study {study} are not cached")
            images = load_study_images(cache_dir, study, cindex)
            # The crop the model input was really cut from (clip_box may round it or drop a tiny box).
            crop = clip_box(crop_boxes.get(study), images.shape[1], images.shape[2])
            x = preprocess_study(images, cfg, crop, [int(r) for r in rows]).float().to(dev)
            cams = np.concatenate([grad_cam(model, xb, layer) for xb in x.split(batch_size)])
            igs = (np.concatenate([integrated_gradients(model, xb, steps=ig_steps) for xb in x.split(batch_size)])
                   if ig else None)
            h, w = x.shape[-2:]
            frame_boxes: list[np.ndarray | None] = []
            for r in ts.itertuples(index=False):
                sop = str(getattr(r, SOP))
                b = None
                if by_box is not None and shapes is not None and sop in by_box and sop in shapes.index:
                    rc = (int(shapes.at[sop, "rows"]), int(shapes.at[sop, "columns"]))
                    b = boxes_to_input_frame(by_box[sop], rc, images.shape[1], crop, (int(h), int(w)))
                frame_boxes.append(b)
            drops: list[float | None] = [None] * len(frame_boxes)
            if any(b is not None and len(b) for b in frame_boxes):
                with torch.no_grad():
                    delta = (logit_of(model(x)) - logit_of(model(fill_boxes(x, frame_boxes)))).cpu().numpy()
                drops = [float(d) if b is not None and len(b) else None for d, b in zip(delta, frame_boxes, strict=True)]
            for j, r in enumerate(ts.itertuples(index=False)):
                out.append(ExplainedSlice(sop=str(getattr(r, SOP)), study=study, fold=fold, prob=float(r.prob),
                                          image=x[j, centre].cpu().numpy(), cam=cams[j],
                                          ig=None if igs is None else igs[j], boxes=frame_boxes[j],
                                          logit_drop=drops[j]))
    return out


def plot_maps(slices: Sequence[ExplainedSlice], path: Path, per_row: int = 4) -> None:
    """Grad-CAM (and IG when present) overlaid on the PE-window channel, true boxes in green, the map
    peak as a white cross."""
    from matplotlib.patches import Rectangle

    from pe.explain import boxes_mask, map_peak

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


def pointing_results(slices: Sequence[ExplainedSlice]) -> dict[str, Any]:
    """The pointing game of each map kind over the slices that have boxes in the input frame."""
    from pe.explain import pointing_game

    boxed = [s for s in slices if s.boxes is not None and len(s.boxes)]
    out: dict[str, Any] = {}
    for name, attr in (("Grad-CAM", "cam"), ("integrated gradients", "ig")):
        use = [s for s in boxed if getattr(s, attr) is not None]
        if use:
            out[name] = pointing_game([getattr(s, attr) for s in use], [s.boxes for s in use])
    return out


# ------------------------------------------------------------------------------------------------
# The whole report
# ------------------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    """Repair reports may be frames or dataclasses: keep them readable in report.json."""
    if isinstance(obj, pd.DataFrame):  # the hierarchy repair's per-exam report: keep its summary
        from pe.hierarchy import summarize_repair

        return _jsonable(summarize_repair(obj))
    if isinstance(obj, (dict, list, str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    return str(obj)


def _repair_text(report: Any) -> str:
    if report is None:
        return ""
    if isinstance(report, pd.DataFrame):
        from pe.hierarchy import format_repair_summary, summarize_repair

        return format_repair_summary(summarize_repair(report))
    if isinstance(report, dict):
        return json.dumps(_jsonable(report), indent=1, default=str)
    return str(report)


def select_explained(ev: Evaluation, cnn_probs: pd.Series | None, boxes: pd.DataFrame | None,
                     fold_of: pd.Series, n_cams: int, max_pointing: int, seed: int = 0) -> tuple[pd.DataFrame, set[str], set[str]]:
    """Slices to explain: the ``n_cams`` true-positive slices with the highest CNN probability (for
    display) and up to ``max_pointing`` randomly drawn positive slices with embolus boxes (for the
    pointing game), restricted to studies with a validation fold. Returns (targets, display SOPs,
    pointing SOPs)."""
    s = ev.scorer
    study = s.study_ids[s.image_study].astype(str)
    df = pd.DataFrame({SOP: s.image_ids.astype(str), STUDY: study, "truth": s.image_truth,
                       "final_prob": ev.image_probs})
    df["prob"] = df["final_prob"] if cnn_probs is None else cnn_probs.reindex(df[SOP]).to_numpy()
    df["prob"] = df["prob"].fillna(df["final_prob"])
    pos = df[(df["truth"] > 0.5) & df[STUDY].isin(fold_of.index)]
    display = set(pos.sort_values("prob", ascending=False, kind="stable")[SOP].head(n_cams))
    pointing: set[str] = set()
    if boxes is not None:
        boxed = pos[pos[SOP].isin(set(boxes[SOP].astype(str)))]
        if len(boxed) > max_pointing:
            boxed = boxed.sample(n=max_pointing, random_state=seed)
        pointing = set(boxed[SOP])
    targets = pos[pos[SOP].isin(display | pointing)][[SOP, STUDY, "prob"]]
    return targets.reset_index(drop=True), display, pointing


def build_report(exp: str, out_dir: str | Path | None = None, cnn_exp: str | None = None,
                 n_studies: int = 6, n_cams: int = 8, ig: bool = False, ig_steps: int = 32,
                 max_pointing: int = 256, device: str = "cpu", truth_path: str | Path | None = None,
                 explain: bool = True, cam_layer: str | None = None) -> dict[str, Any]:
    """Write ``out_dir/index.html`` (default ``reports/<exp>``) with its PNGs and ``report.json``;
    returns the summary written to ``report.json``."""
    out = Path(out_dir) if out_dir is not None else paths.reports_dir() / exp
    out.mkdir(parents=True, exist_ok=True)
    cnn_exp = cnn_exp or resolve_cnn_exp(exp)
    pred = load_predictions(exp)
    truth = load_truth(truth_path)
    ev = evaluate(pred, truth)
    bds = ev.breakdowns
    summary: dict[str, Any] = {"exp": exp, "cnn_exp": cnn_exp, "breakdowns": bds,
                               "repair_report": _jsonable(ev.repair_report), "notes": []}
    notes: list[str] = summary["notes"]
    s = ev.scorer
    sections: list[tuple[str, str]] = []

    intro = (f"<p>Out-of-fold predictions <code>oof/{html.escape(exp)}</code> scored against "
             f"<code>train.csv</code>: {s.n_studies} studies ({bds['oof']['n_pe_studies']} with PE), "
             f"{s.n_images} images. Stage-1 CNN for explanation maps: <code>{html.escape(cnn_exp)}</code>. "
             f"Generated {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}.</p>")
    scores = "".join(f"<li>{html.escape(k)}: <b>{fmt(v['score'])}</b></li>" for k, v in bds.items())
    sections.append(("Summary", intro + f"<ul>{scores}</ul>"))

    repair_txt = _repair_text(ev.repair_report)
    sections.append(("Competition metric per label", (
        "<p class='note'>loss = the label's contribution to the weighted log loss (contributions sum to the "
        "score); weight = its share of the total weight; AUC over its rows (n/a with one class). "
        "<i>oof</i>: the predictions as written; <i>repaired</i>: after the label-hierarchy repair; "
        "<i>prior</i>: training label means.</p>" + metric_table(bds)
        + (f"<details><summary>repair report</summary><pre>{html.escape(repair_txt)}</pre></details>"
           if repair_txt else ""))))
    sections.append(("Sensitivity, specificity, PPV, NPV, F1 at 0.5",
                     "<p class='note'>exam PE: predicted positive when 1 - P(negative_exam_for_pe) &gt; 0.5, "
                     "truth = the exam has a positive image; image: P(PE on slice) &gt; 0.5.</p>"
                     + stats_table(bds)))

    summary["roc_auc"] = plot_roc(ev, out / "roc.png")
    sections.append(("ROC curves", img("roc.png", "ROC curves")))
    summary["ece"] = plot_calibration(ev, out / "calibration.png")
    sections.append(("Calibration", img("calibration.png", "reliability diagrams")
                     + html_table(["probabilities", "expected calibration error"],
                                  [[k, v] for k, v in summary["ece"].items()], table_id="ece-table")))

    losses = per_study_loss(s, ev.image_probs, ev.exam_probs)
    chosen = choose_studies(ev, losses, min(n_studies, s.n_studies))
    cnn_probs = load_cnn_slice_probs(cnn_exp)
    if chosen:
        rows = plot_slice_curves(ev, losses, chosen, load_slice_order(truth), cnn_probs, out / "slices.png")
        summary["slice_curves"] = rows
        sections.append(("Slice probabilities along the study", (
            "<p class='note'>Best PE-positive and worst studies by their own weighted log loss; green: true "
            "slice labels, blue: final slice probabilities, orange: the stage-1 CNN's.</p>"
            + img("slices.png", "slice probability curves")
            + html_table(["kind", "study", "loss", "slices", "PE", "P(PE exam)"],
                         [[r["kind"], r["study"], r["loss"], r["n_slices"], r["truth_pe"], r["p_pe_exam"]]
                          for r in rows], table_id="studies-table", digits=4))))

    if explain:
        try:
            maps_html = _explanations(ev, cnn_exp, cnn_probs, out, summary, n_cams, ig, ig_steps, max_pointing,
                                      device, cam_layer)
        except Exception as e:
            # The metric sections stand on their own: write them, say loudly what failed (the CLI
            # exits non-zero on explain_error).
            log.exception("explanation maps failed: %s: %s", type(e).__name__, e)
            summary["explain_error"] = f"{type(e).__name__}: {e}"
            notes.append(f"explanation maps failed: {summary['explain_error']}")
            maps_html = f"<p><b>failed</b>: {html.escape(summary['explain_error'])}</p>"
    else:
        maps_html = "<p>explanation maps not requested</p>"
    sections.append(("Explanation maps", maps_html))
    if notes:
        sections.append(("Notes", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"))
    sections.append(("Data", "<p>Every number of this page, and more: <a href=\"report.json\">report.json</a>.</p>"))
    summary["index"] = str(out / "index.html")
    write_html(out / "index.html", f"PE report: {exp}", sections)
    write_json_atomic(out / "report.json", summary)
    return summary


def _explanations(ev: Evaluation, cnn_exp: str, cnn_probs: pd.Series | None, out: Path, summary: dict[str, Any],
                  n_cams: int, ig: bool, ig_steps: int, max_pointing: int, device: str,
                  cam_layer: str | None = None) -> str:
    notes: list[str] = summary["notes"]
    # The CNN's own OOF files say which fold model did not see a study; folds.csv is the fallback.
    fold_of = cnn_oof_folds(cnn_exp)
    if fold_of is None:
        fold_of = study_folds()
    if fold_of is None:
        notes.append(f"no oof/{cnn_exp}/cnn_fold<k>.parquet and no {paths.folds_path()}: explanation maps skipped")
        return "<p>no folds: skipped</p>"
    if not any((paths.run_dir(cnn_exp, k) / "best.pt").is_file() for k in sorted(set(fold_of))):
        notes.append(f"no {paths.models_dir() / cnn_exp}/fold<k>/best.pt: explanation maps skipped")
        return "<p>no CNN checkpoints: skipped</p>"
    boxes = load_embolus_boxes()
    shapes = original_shapes() if boxes is not None else None
    if boxes is not None and shapes is None:
        notes.append(f"{paths.meta_path('train')} not found: embolus boxes cannot be scaled, no pointing game")
        boxes = None
    targets, display, pointing = select_explained(ev, cnn_probs, boxes, fold_of, n_cams, max_pointing)
    if targets.empty:
        notes.append("no positive slice in a study with a validation fold: explanation maps skipped")
        return "<p>no positive slices: skipped</p>"
    slices = explain_slices(cnn_exp, targets, fold_of, boxes, shapes, ig=ig, ig_steps=ig_steps, device=device,
                            cam_layer=cam_layer)
    summary["cam_layer"] = cam_layer or "gradcam_layer (last feature map)"
    shown = sorted((x for x in slices if x.sop in display), key=lambda x: -x.prob)
    parts = []
    if shown:
        plot_maps(shown, out / "maps.png")
        parts.append("<p class='note'>Most confident true-positive slices (stage-1 CNN probability), each "
                     "explained by the fold model that did not train on it. Grad-CAM (shi2020 eqs. 1–2) on "
                     f"<code>{html.escape(summary['cam_layer'])}</code>, over the PE-window channel of the centre slice; green: true embolus boxes; white cross: map "
                     "peak.</p>" + img("maps.png", "explanation maps"))
    results = pointing_results([x for x in slices if x.sop in pointing])
    summary["pointing_game"] = {k: vars(r) for k, r in results.items()}
    if results:
        for name, r in results.items():
            print(r.summary(name))
        parts.append("<p class='note'>Pointing game: a map hits when its peak pixel lies inside a true "
                     "embolus box (boxes mapped to the model input frame through the cache resize, the lung "
                     "crop and the input resize). Chance = mean share of the slice the boxes cover.</p>"
                     + html_table(["map", "slices", "hits", "accuracy", "chance rate", "accuracy / chance"],
                                  [[k, r.n, r.hits, r.accuracy, r.chance,
                                    r.accuracy / r.chance if r.chance > 0 else float("nan")]
                                   for k, r in results.items()], table_id="pointing-table", digits=4))
        drops = np.array([x.logit_drop for x in slices if x.sop in pointing and x.logit_drop is not None])
        if len(drops):
            occ = {"n": int(len(drops)), "mean_logit_drop": float(drops.mean()),
                   "share_dropping": float((drops > 0).mean())}
            summary["occlusion"] = occ
            print(f"emboli filled in: PE logit drops by {occ['mean_logit_drop']:+.3f} on average, "
                  f"on {occ['share_dropping']:.0%} of {occ['n']} slices")
            parts.append("<p class='note'>Occlusion check: each embolus box painted over with the "
                         "surrounding artery's contrast (90th percentile of the box grown by 3 px). A model "
                         "that detects the emboli themselves loses PE logit; one that relies on context "
                         "does not, and then no explanation map can point at the emboli.</p>"
                         + html_table(["slices", "mean PE-logit drop", "share of slices whose logit drops"],
                                      [[occ["n"], occ["mean_logit_drop"], occ["share_dropping"]]],
                                      table_id="occlusion-table", digits=4))
    elif boxes is None:
        parts.append("<p class='note'>No embolus boxes in the data (train_boxes.csv): no pointing game.</p>")
    return "\n".join(parts)
