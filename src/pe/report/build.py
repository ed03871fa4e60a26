"""An offline HTML report of one experiment's out-of-fold predictions, with explanation maps.

``build_report(exp, out_dir, ...)`` (used by ``src/10_report.py``) writes ``out_dir/index.html``,
its PNGs (matplotlib Agg, relative links: the folder opens offline anywhere) and ``report.json``
(every number in the tables). Sections:

1. The OOF metric per label (loss contribution, weight share, AUC) for the raw predictions, after
   the hierarchy repair (:func:`pe.eval.hierarchy.repair_long`) and for the prior baseline
   (:func:`pe.eval.baselines.prior_predictions`); the numbers are :func:`pe.eval.metric.score_breakdown`'s, the
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
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or Kaggle
import dataclasses

import pandas as pd  # noqa: E402

from pe import paths
from pe.data.tables import read_truth  # noqa: E402
from pe.eval.hierarchy import format_repair_summary, summarize_repair
from pe.eval.pred_files import cnn_exp_of, read_cnn_oof, read_predictions  # noqa: E402
from pe.io import write_json_atomic  # noqa: E402
from pe.report.evaluation import Evaluation, choose_studies, evaluate, per_study_loss  # noqa: E402
from pe.report.explain_maps import explanation_section  # noqa: E402
from pe.report.html import fmt, html_table, img, metric_table, stats_table, write_html  # noqa: E402
from pe.report.inputs import load_slice_order  # noqa: E402
from pe.report.localization import localization_section
from pe.report.plots import plot_calibration, plot_roc, plot_slice_curves  # noqa: E402
from pe.rspect import SOP  # noqa: E402

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# The whole report
# ------------------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    """Repair reports may be frames or dataclasses: keep them readable in report.json."""
    if isinstance(obj, pd.DataFrame):  # the hierarchy repair's per-exam report: keep its summary

        return _jsonable(summarize_repair(obj))
    if isinstance(obj, (dict, list, str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "__dataclass_fields__"):

        return dataclasses.asdict(obj)
    return str(obj)


def _repair_text(report: Any) -> str:
    if report is None:
        return ""
    if isinstance(report, pd.DataFrame):

        return format_repair_summary(summarize_repair(report))
    if isinstance(report, dict):
        return json.dumps(_jsonable(report), indent=1, default=str)
    return str(report)


def build_report(exp: str, out_dir: str | Path | None = None, cnn_exp: str | None = None,
                 n_studies: int = 6, n_cams: int = 8, ig: bool = False, ig_steps: int = 32,
                 max_pointing: int = 256, device: str = "cpu", truth_path: str | Path | None = None,
                 explain: bool = True, cam_layer: str | None = None) -> dict[str, Any]:
    """Write ``out_dir/index.html`` (default ``reports/<exp>``) with its PNGs and ``report.json``;
    returns the summary written to ``report.json``."""
    out = Path(out_dir) if out_dir is not None else paths.reports_dir() / exp
    out.mkdir(parents=True, exist_ok=True)
    cnn_exp = cnn_exp or cnn_exp_of(exp)  # None: no run config says which CNN made the embeddings
    pred = read_predictions(exp)
    truth = read_truth(truth_path)
    ev = evaluate(pred, truth)
    bds = ev.breakdowns
    summary: dict[str, Any] = {"exp": exp, "cnn_exp": cnn_exp, "breakdowns": bds,
                               "repair_report": _jsonable(ev.repair_report), "notes": []}
    notes: list[str] = summary["notes"]
    s = ev.scorer
    sections: list[tuple[str, str]] = []

    intro = (f"<p>Out-of-fold predictions <code>oof/{html.escape(exp)}</code> scored against "
             f"<code>train.csv</code>: {s.n_studies} studies ({bds['oof']['n_pe_studies']} with PE), "
             f"{s.n_images} images. Stage-1 CNN for explanation maps: <code>{html.escape(cnn_exp or 'none found')}</code>. "
             f"Generated {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}.</p>")
    scores = "".join(f"<li>{html.escape(k)}: <b>{fmt(v['score'])}</b></li>" for k, v in bds.items())
    sections.append(("Summary", intro + f"<ul>{scores}</ul>"))

    sections += _metric_sections(ev, out, summary)
    losses = per_study_loss(s, ev.image_probs, ev.exam_probs)
    chosen = choose_studies(ev, losses, min(n_studies, s.n_studies))
    cnn_oof = read_cnn_oof(cnn_exp) if cnn_exp else None
    cnn_probs = None if cnn_oof is None else cnn_oof.drop_duplicates(SOP).set_index(SOP)["prob"]
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

    maps_html = _maps_section(ev, cnn_exp, cnn_probs, out, summary, explain, n_cams, ig, ig_steps, max_pointing,
                              device, cam_layer)
    sections.append(("Explanation maps", maps_html))
    try:
        loc_html = localization_section(cnn_exp, out, summary)
    except Exception as e:  # the rest of the page stands on its own
        log.exception("localisation panels failed: %s: %s", type(e).__name__, e)
        notes.append(f"localisation panels failed: {type(e).__name__}: {e}")
        loc_html = None
    if loc_html is not None:
        sections.append(("Weakly supervised localisation (stages 11 and 12)", loc_html))
    if notes:
        sections.append(("Notes", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"))
    sections.append(("Data", "<p>Every number of this page, and more: <a href=\"report.json\">report.json</a>.</p>"))
    summary["index"] = str(out / "index.html")
    write_html(out / "index.html", f"PE report: {exp}", sections)
    write_json_atomic(out / "report.json", summary)
    return summary


def _metric_sections(ev: Evaluation, out: Path, summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Per-label metric, binary statistics, ROC and calibration sections (figures written to ``out``)."""
    bds = ev.breakdowns
    sections: list[tuple[str, str]] = []
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
    return sections


def _maps_section(ev: Evaluation, cnn_exp: str | None, cnn_probs: pd.Series | None, out: Path,
                  summary: dict[str, Any], explain: bool, n_cams: int, ig: bool, ig_steps: int,
                  max_pointing: int, device: str, cam_layer: str | None) -> str:
    """HTML of the explanation maps; a failure is written into the page and ``summary`` (the CLI
    exits non-zero on ``explain_error``) instead of losing the metric sections."""
    notes: list[str] = summary["notes"]
    if not explain:
        return "<p>explanation maps not requested</p>"
    if cnn_exp is None:
        notes.append("no run config names the stage-1 CNN (cnn_exp): explanation maps skipped")
        return "<p>no CNN experiment: skipped</p>"
    try:
        return explanation_section(ev, cnn_exp, cnn_probs, out, summary, n_cams, ig, ig_steps, max_pointing,
                             device, cam_layer)
    except Exception as e:
        # The metric sections stand on their own: write them, say loudly what failed.
        log.exception("explanation maps failed: %s: %s", type(e).__name__, e)
        summary["explain_error"] = f"{type(e).__name__}: {e}"
        notes.append(f"explanation maps failed: {summary['explain_error']}")
        return f"<p><b>failed</b>: {html.escape(summary['explain_error'])}</p>"
