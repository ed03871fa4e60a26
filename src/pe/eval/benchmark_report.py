"""Figures, table and page of the quality benchmark (bench/bench_quality.py), from the files its
pipeline runs wrote: the held-out submissions, the CNN's fold-averaged test slice probabilities and
the fold models (Grad-CAM pointing game). Intervals and pairing: :mod:`pe.eval.benchmark`."""

from __future__ import annotations

import contextlib
import html
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pe.data.tables import read_truth
from pe.eval import benchmark as bm
from pe.eval import metric, submission
from pe.eval.baselines import max_aggregation_predictions, prior_predictions
from pe.eval.hierarchy import repair_long
from pe.eval.voting import fit_voting, probs_by_study, study_pe_labels
from pe.io import write_json_atomic, write_text_atomic
from pe.rspect import SOP, STUDY

MAIN_KEYS: tuple[str, ...] = ("score", "study_pe_auc", "image_auc")
EXAM_AUC_KEYS: tuple[str, ...] = tuple(f"auc:{lab}" for lab in bm.EXAM_LABELS)
LOSS_KEYS: tuple[str, ...] = tuple(f"loss:{lab}" for lab in bm.LABELS)  # per-label contributions to the metric
FIGURE_KEYS: tuple[str, ...] = (*MAIN_KEYS, *LOSS_KEYS, *EXAM_AUC_KEYS)
BOX_FILES: tuple[str, ...] = ("phantom_test_boxes.csv", "train_boxes.csv")


@contextlib.contextmanager
def pipeline_env(run: Path, data: Path) -> Iterator[None]:
    """Point src/pe/paths.py at one run's folders inside this process (explanation maps)."""
    new = {"PE_WORK_DIR": str(run / "work"), "PE_OOF_DIR": str(run / "oof"), "PE_DATA_DIR": str(data)}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def heldout_boxes(data: Path, sops: set[str]) -> pd.DataFrame | None:
    """Embolus boxes (SOPInstanceUID, x, y, width, height; original pixels) of held-out slices."""
    frames = [pd.read_csv(data / f, dtype={SOP: str}) for f in BOX_FILES if (data / f).is_file()]
    if not frames:
        return None
    boxes = pd.concat(frames, ignore_index=True)
    boxes = boxes[boxes[SOP].isin(sops)]
    return boxes if len(boxes) else None


def pointing_per_study(run: Path, data: Path, scorer: metric.Scorer, cnn_probs: np.ndarray, folds: int,
                       max_slices: int, seed: int) -> dict[str, np.ndarray] | None:
    """Grad-CAM pointing game of the fold models on up to ``max_slices`` boxed positive held-out
    slices (held-out study i explained by fold model i mod K: none of them trained on it), through
    :func:`pe.report.explain_maps.explain_slices` and :func:`pe.explain.cam.pointing_game`. Returns per-study
    hits, counts, chance sums, constant (peakless) maps, peaks within TOLERANCE_PX of a box, non-constant maps and
    their summed map mass inside the boxes (scorer order), or None without boxes."""
    from pe.explain.pointing import boxes_mask, pointing_game
    from pe.report.explain_maps import explain_slices

    boxes = heldout_boxes(data, set(scorer.image_ids.astype(str)))
    if boxes is None:
        return None
    df = pd.DataFrame({SOP: scorer.image_ids.astype(str), STUDY: scorer.study_ids[scorer.image_study].astype(str),
                       "prob": cnn_probs, "truth": scorer.image_truth, "code": scorer.image_study})
    df = df[(df["truth"] > 0.5) & df[SOP].isin(set(boxes[SOP]))]
    if len(df) > max_slices:
        df = df.sample(n=max_slices, random_state=seed)
    fold_of = pd.Series(np.arange(scorer.n_studies) % folds, index=scorer.study_ids.astype(str))
    shapes = pd.read_parquet(run / "work" / "meta" / "test.parquet", columns=[SOP, "rows", "columns"]).set_index(SOP)
    with pipeline_env(run, data):
        slices = explain_slices("cnn", df[[SOP, STUDY, "prob"]], fold_of, boxes, shapes)
    code = dict(zip(df[SOP], df["code"], strict=True))
    out = {k: np.zeros(scorer.n_studies) for k in ("hits", "n", "chance", "constant", "near", "near_chance", "on", "mass")}
    for s in slices:
        if s.boxes is None or not len(s.boxes) or not boxes_mask(s.cam.shape, s.boxes).any():
            continue
        r = pointing_game([s.cam], [s.boxes])
        i = code[s.sop]
        out["hits"][i] += r.hits
        out["n"][i] += 1
        out["chance"][i] += r.chance
        out["constant"][i] += r.constant
        out["near"][i] += r.near
        out["near_chance"][i] += r.near_chance
        if not r.constant:
            out["on"][i] += 1
            out["mass"][i] += r.mass
    return out if out["n"].sum() else None


def resolved_configs(run: Path, v: bm.Variant) -> dict[str, Any]:
    """The configs the stages really ran with (fold 0's run folders: every fold gets the same)."""
    import yaml

    def read(exp: str) -> Any:
        f = run / "work" / "models" / exp / "fold0" / "config.yaml"
        return yaml.safe_load(f.read_text()) if f.is_file() else None

    return {"cnn": read("cnn"), "seq": [read(f"{v.name}_m{i}") for i in range(len(v.seq))]}


def _ratio(num: np.ndarray, den: np.ndarray) -> bm.Stat:
    return lambda w: float(w @ num / (w @ den)) if w @ den > 0 else float("nan")


def scored_and_ranked(scorer: metric.Scorer, beliefs: pd.DataFrame, submitted: pd.DataFrame | None,
                      ids: pd.DataFrame) -> bm.StudyParts:
    """Parts of one prediction set: the metric from ``submitted`` (the repaired submission; None:
    repair ``beliefs`` here, as 08_make_submission does) and the AUCs from ``beliefs``, the
    predictions before the hierarchy repair (:func:`pe.eval.benchmark.ranked_by` says why)."""
    if submitted is None:
        submitted, _ = repair_long(beliefs, ids)
    return bm.ranked_by(bm.study_parts(scorer, submitted), bm.study_parts(scorer, beliefs))


def voting_calls(run: Path, train_truth: pd.DataFrame, heldout: pd.DataFrame, scorer: metric.Scorer
                 ) -> dict[str, Any] | None:
    """The voting study head (pe.eval.voting; papers/condrea2023 eqs. 1-2): (mu, delta) fitted for F1
    on the CNN's out-of-fold slice probabilities of the training studies, applied to the held-out
    studies' fold-averaged probabilities. None when the OOF files are missing."""
    files = sorted((run / "oof" / "cnn").glob("cnn_fold*.parquet"))
    if not files:
        return None
    oof = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    labels = study_pe_labels(train_truth)
    probs = probs_by_study(oof)
    rule = fit_voting({s: p for s, p in probs.items() if s in labels}, labels)
    calls = rule.predict(probs_by_study(heldout))
    called = np.array([bool(calls.get(str(s), 0)) for s in scorer.study_ids])
    return {"mu": rule.mu, "delta": rule.delta, "train_f1": rule.f1, "called": called}


def heldout_cnn_probs(run: Path, scorer: metric.Scorer) -> tuple[pd.DataFrame, np.ndarray]:
    """A run's CNN on the held-out slices: its fold models' test index averaged, and the slice
    probabilities in the scorer's image order (an error when a held-out slice has none)."""
    idx = bm.fold_average(sorted((run / "work" / "embeddings" / "cnn").glob("fold*/test/index.parquet")))
    probs = idx.set_index(SOP)["prob"].reindex(scorer.image_ids.astype(str)).to_numpy(np.float64)
    if np.isnan(probs).any():
        raise bm.BenchError(f"{run}: the CNN's test embeddings miss {int(np.isnan(probs).sum())} held-out slices")
    return idx, probs


def cnn_figures(run: Path, data: Path, scorer: metric.Scorer, train_truth: pd.DataFrame, ids: pd.DataFrame,
                args: Any, runner: Any) -> dict[str, Any]:
    """Per CNN run: the fold-averaged slice probabilities, the max-aggregation baseline's parts
    (metric after the same hierarchy repair as every variant's submission, AUCs before it) and the
    pointing game's per-study counts."""
    idx, probs = heldout_cnn_probs(run, scorer)
    maxagg = scored_and_ranked(scorer, max_aggregation_predictions(idx, train_truth), None, ids)
    vote = voting_calls(run, train_truth, idx, scorer)
    top = idx.groupby(STUDY)["prob"].max()
    maxagg_called = top.reindex(pd.Index(scorer.study_ids).astype(str)).fillna(0).to_numpy() > 0.5
    point = runner.timed(f"{run.name}/explain", "explain", pointing_per_study, run, data, scorer, probs,
                         args.folds, args.max_pointing, 0)
    return {"probs": probs, "maxagg": maxagg, "pointing": point, "vote": vote, "maxagg_called": maxagg_called,
            "slice_auc": bm.slice_auc_stat(scorer.image_study, scorer.image_truth, probs)}


def _cis(stats: Mapping[str, bm.Stat], n: int, n_boot: int) -> dict[str, Any]:
    return {k: bm.ci(n, s, n_boot, seed=0) for k, s in stats.items()}


def evaluate(args: Any, variants: Sequence[bm.Variant], seeds: Sequence[int], runs: Mapping[tuple[str, int], Path],
             data: Path, truth_file: Path, runner: Any) -> dict[str, Any]:
    """Every figure with its interval (see the benchmark's docstring); also writes nothing."""
    truth = read_truth(truth_file)
    train_truth = read_truth(data / "train.csv")
    scorer = metric.Scorer(truth)
    n, nb = scorer.n_studies, args.n_boot
    ids = truth[[STUDY, SOP]]
    cnn = {run: cnn_figures(run, data, scorer, train_truth, ids, args, runner) for run in sorted(set(runs.values()))}
    prior = scored_and_ranked(scorer, prior_predictions(train_truth, ids), None, ids)
    res: dict[str, Any] = {"n_heldout_studies": n, "n_heldout_images": scorer.n_images,
                           "n_heldout_pe_studies": int((scorer.q > 0).sum()),
                           "n_train_studies": int(train_truth[STUDY].nunique()),
                           "heldout_label_positives": {lab: int(scorer.exam_truth[:, j].sum())
                                                       for j, lab in enumerate(bm.EXAM_LABELS)},
                           "prior": _cis({k: bm.figure_stat(prior, k) for k in ("score", "study_pe_auc", *FIGURE_KEYS[3:])}, n, nb),
                           "variants": {}, "paired": {}}
    stats: dict[str, dict[str, list[bm.Stat]]] = {}
    for v in variants:
        per_seed, stats[v.name] = {}, {k: [] for k in FIGURE_KEYS}
        for seed in seeds:
            csv = args.out / "predictions" / f"{v.name}_seed{seed}.csv"
            raw = runs[(v.name, seed)] / "oof" / f"ens_{v.name}" / "test.csv"  # 08's input: before the repair
            parts = scored_and_ranked(scorer, submission.read_submission(raw), submission.read_submission(csv), ids)
            c = cnn[runs[(v.name, seed)]]
            seed_stats = {k: bm.figure_stat(parts, k) for k in FIGURE_KEYS}
            seed_stats["maxagg_score"] = bm.figure_stat(c["maxagg"], "score")
            seed_stats["maxagg_study_pe_auc"] = bm.figure_stat(c["maxagg"], "study_pe_auc")
            seed_stats["cnn_slice_auc"] = c["slice_auc"]
            # study-level yes/no calls (determinate studies): stage 2 at P(PE) > 0.5 (its beliefs),
            # CNN max-aggregation at max slice probability > 0.5, the voting head (issue 16, item 4)
            calls = {"call": parts.exam_prob[:, bm.EXAM_LABELS.index("negative_exam_for_pe")] < 0.5,
                     "maxagg_call": c["maxagg_called"]}
            if c["vote"] is not None:
                calls["vote_call"] = c["vote"]["called"]
            for prefix, called in calls.items():
                for k, st in bm.call_stats(parts, called).items():
                    seed_stats[f"{prefix}:{k}"] = st
            if c["pointing"] is not None:
                seed_stats["pointing"] = _ratio(c["pointing"]["hits"], c["pointing"]["n"])
                seed_stats["pointing_chance"] = _ratio(c["pointing"]["chance"], c["pointing"]["n"])
                seed_stats["pointing_constant"] = _ratio(c["pointing"]["constant"], c["pointing"]["n"])
                seed_stats["pointing_near"] = _ratio(c["pointing"]["near"], c["pointing"]["n"])
                seed_stats["pointing_near_chance"] = _ratio(c["pointing"]["near_chance"], c["pointing"]["n"])
                seed_stats["pointing_mass"] = _ratio(c["pointing"]["mass"], c["pointing"]["on"])
            for k, s in seed_stats.items():
                stats[v.name].setdefault(k, []).append(s)
            per_seed[seed] = {"predictions": str(csv.relative_to(args.out)), "run": str(runs[(v.name, seed)].name),
                              "predictions_before_repair": str(raw),
                              "voting_rule": None if c["vote"] is None else
                              {k: c["vote"][k] for k in ("mu", "delta", "train_f1")},
                              "resolved_configs": resolved_configs(runs[(v.name, seed)], v),
                              "figures": _cis(seed_stats, n, nb),
                              "pointing_slices": None if c["pointing"] is None else int(c["pointing"]["n"].sum())}
        mean = _cis({k: bm.mean_over(s) for k, s in stats[v.name].items()}, n, nb)
        spread = {k: bm.seed_spread([per_seed[s]["figures"][k]["estimate"] for s in seeds]) for k in MAIN_KEYS}
        res["variants"][v.name] = {"spec": v.as_dict(), "seeds": per_seed, "mean": mean, "seed_spread": spread}
    base = stats["baseline"]
    for v in variants[1:]:
        res["paired"][v.name] = _cis({k: bm.paired_difference(stats[v.name][k], base[k])
                                      for k in (*MAIN_KEYS, *LOSS_KEYS)}, n, nb)
    # stage 2 against the CNN max-aggregation of the same CNN, paired (issue 14, item 3's yardstick)
    for v in variants:
        res["variants"][v.name]["minus_maxagg"] = _cis({
            "score": bm.paired_difference(stats[v.name]["score"], stats[v.name]["maxagg_score"]),
            "study_pe_auc": bm.paired_difference(stats[v.name]["study_pe_auc"], stats[v.name]["maxagg_study_pe_auc"])},
            n, nb)
    return res


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def fmt_num(x: float | None, digits: int = 4) -> str:
    """A number, or n/a for None / NaN (an undefined AUC, a spread over one seed)."""
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def fmt_ci(c: Mapping[str, float] | None, digits: int = 4) -> str:
    if c is None or fmt_num(c["estimate"]) == "n/a":
        return "n/a"
    return f"{fmt_num(c['estimate'], digits)} [{fmt_num(c['low'], digits)}, {fmt_num(c['high'], digits)}]"


def format_table(r: Mapping[str, Any]) -> str:
    """The printed table: one row per variant and seed plus the mean over seeds, the baselines, the
    paired differences and the seed spread."""
    w = max([14, *(len(n) + 2 for n in r["variants"])])  # name column
    head = f"{'variant':<{w}}{'seed':<6}{'metric':<26}{'study PE AUC':<26}{'image AUC':<26}"
    lines = [f"held-out: {r['n_heldout_studies']} studies ({r['n_heldout_pe_studies']} with PE), "
             f"{r['n_heldout_images']} images; trained on {r['n_train_studies']} studies, {r['folds']} folds; "
             f"95 % bootstrap intervals over studies ({r['n_boot']} resamples); metric: lower is better",
             "", head, "-" * len(head)]
    for name, v in r["variants"].items():
        rows = [(str(s), d["figures"]) for s, d in v["seeds"].items()] + [("mean", v["mean"])]
        for seed, f in rows:
            lines.append(f"{name:<{w}}{seed:<6}" + "".join(f"{fmt_ci(f[k]):<26}" for k in MAIN_KEYS))
    lines.append("-" * len(head))
    lines += _exam_auc_lines(r, w)
    lines.append("-" * len(head))
    lines.append(f"{'prior':<{w + 6}}{fmt_ci(r['prior']['score']):<26}{fmt_ci(r['prior']['study_pe_auc']):<26}")
    by_cnn: dict[tuple[str, ...], list[str]] = {}  # variants sharing their CNN runs share these rows
    for name, v in r["variants"].items():
        by_cnn.setdefault(tuple(d["run"] for d in v["seeds"].values()), []).append(name)
    for names in by_cnn.values():
        m = r["variants"][names[0]]["mean"]
        lines.append(f"{'max-agg':<{w}}{'mean':<6}{fmt_ci(m['maxagg_score']):<26}{fmt_ci(m['maxagg_study_pe_auc']):<26}"
                     f"(CNN of {', '.join(names)})")
        lines.append(f"{'CNN slice AUC':<{w + 6}}{fmt_ci(m['cnn_slice_auc']):<26}"
                     + (f"pointing game {fmt_ci(m['pointing'], 3)} vs chance {fmt_num(m['pointing_chance']['estimate'], 3)}"
                        if "pointing" in m else "pointing game: no embolus boxes"))
        if "pointing_near" in m:
            from pe.explain.pointing import TOLERANCE_PX  # lazy, as in pointing_per_study (torch)
            lines.append(f"{'':<{w + 6}}Grad-CAM peak within {TOLERANCE_PX:g} px of a box {fmt_ci(m['pointing_near'], 3)} vs chance "
                         f"{fmt_num(m['pointing_near_chance']['estimate'], 3)}, constant maps "
                         f"{fmt_ci(m['pointing_constant'], 3)}, map mass inside the boxes {fmt_ci(m['pointing_mass'], 3)}")
    lines += ["", "paired differences (mean over seeds of the per-seed difference; same studies resampled):"]
    for name, v in r["variants"].items():
        d = v["minus_maxagg"]
        lines.append(f"  {name} - max-agg: metric {fmt_ci(d['score'])}, study PE AUC {fmt_ci(d['study_pe_auc'])}")
    for name, d in r["paired"].items():
        lines.append(f"  {name} - baseline: " + ", ".join(f"{k} {fmt_ci(d[k])}" for k in MAIN_KEYS))
    lines += _label_loss_lines(r, w)
    lines += _call_lines(r, by_cnn, w)
    sp = r["variants"]["baseline"]["seed_spread"]
    lines.append("seed spread of the baseline (sd over seeds, range): "
                 + ", ".join(f"{k} {fmt_num(sp[k]['sd'])} / {fmt_num(sp[k]['range'])}" for k in MAIN_KEYS))
    return "\n".join(lines)


def _call_lines(r: Mapping[str, Any], by_cnn: Mapping[tuple[str, ...], list[str]], w: int) -> list[str]:
    """Study-level yes/no calls on the determinate held-out studies (mean over seeds): each stage 2 at
    P(PE) > 0.5, and per CNN its max-aggregation (> 0.5) and the voting head (mu, delta fitted on the
    training studies' out-of-fold slices)."""
    rows: list[tuple[str, Mapping[str, Any], str]] = []
    for name, v in r["variants"].items():
        rows.append((f"{name} (stage 2, P > 0.5)", v["mean"], "call"))
    for names in by_cnn.values():
        v = r["variants"][names[0]]
        rows.append((f"max-agg > 0.5 (CNN of {names[0]})", v["mean"], "maxagg_call"))
        rules = [d.get("voting_rule") for d in v["seeds"].values()]
        if rules and all(rules):
            desc = ", ".join(f"mu {x['mu']} delta {x['delta']:.2f}" for x in rules)
            rows.append((f"voting ({desc})", v["mean"], "vote_call"))
    rows = [x for x in rows if f"{x[2]}:f1" in x[1]]
    w = max([max(w, 14) + 18, *(len(label) + 2 for label, _, _ in rows)])  # every label leaves a gap
    out = ["", "study-level calls (determinate held-out studies; mean over seeds):",
           f"  {'':<{w}}{'sens':<8}{'spec':<8}{'PPV':<8}{'NPV':<8}F1 [95 % interval]"]
    for label, m, prefix in rows:
        cells = "".join(f"{fmt_num(m[f'{prefix}:{k}']['estimate'], 3):<8}" for k in bm.CALL_KEYS[:-1])
        out.append(f"  {label:<{w}}{cells}{fmt_ci(m[f'{prefix}:f1'], 3)}")
    return out


def _label_loss_lines(r: Mapping[str, Any], w: int) -> list[str]:
    """The metric split by label: the baseline's contribution of each label (they sum to its metric) and
    each variant's paired difference, so a variant's change of the metric can be traced to its labels."""
    names = [n for n in r["paired"] if LOSS_KEYS[0] in r["paired"][n]]
    if not names:
        return []
    w = max(w, 22)
    base = r["variants"]["baseline"]["mean"]
    lines = ["", "metric by label (baseline's contribution; variant - baseline, paired):",
             f"  {'label':<{w}}{'baseline':<28}" + "".join(f"{n[:26]:<28}" for n in names)]
    for key in LOSS_KEYS:  # 28: a negative interval is 26 characters wide
        lines.append(f"  {key[5:]:<{w}}{fmt_ci(base[key]):<28}" + "".join(f"{fmt_ci(r['paired'][n][key]):<28}" for n in names))
    return lines


def _exam_auc_lines(r: Mapping[str, Any], w: int) -> list[str]:
    """Exam-label AUC per variant (mean over seeds) with the held-out positives of each label."""
    names = list(r["variants"])
    w = max(w, 22)
    lines = [f"{'exam-label AUC (mean)':<{w}}{'n pos':<6}" + "".join(f"{n[:24]:<26}" for n in names)]
    for key in EXAM_AUC_KEYS:
        lab = key[4:]
        cells = [r["variants"][n]["mean"].get(key) for n in names]
        lines.append(f"{lab:<{w}}{r['heldout_label_positives'].get(lab, 0):<6}"
                     + "".join(f"{fmt_ci(c, 3):<26}" for c in cells))
    return lines


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def plot_labels(r: Mapping[str, Any], path: Path) -> None:
    """Per-label loss contributions (mean over seeds) of every variant and of the prior (grey), with
    their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {**{name: v["mean"] for name, v in r["variants"].items()}, "prior": r["prior"]}
    x = np.arange(len(bm.LABELS))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for i, (name, m) in enumerate(series.items()):
        est = np.array([m[f"loss:{lab}"]["estimate"] for lab in bm.LABELS])
        lo = np.array([m[f"loss:{lab}"]["low"] for lab in bm.LABELS])
        hi = np.array([m[f"loss:{lab}"]["high"] for lab in bm.LABELS])
        ax.bar(x + i * width, est, width, yerr=[est - lo, hi - est], capsize=2, label=name,
               color="0.7" if name == "prior" else None)
    ax.set_xticks(x + 0.4 - width / 2, bm.LABELS, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("contribution to the metric (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path) -> str:
    """results.json, table.txt, labels.png and index.html; returns the table."""
    table = format_table(results)
    results["table"] = table
    write_json_atomic(out / "results.json", _clean(results))
    write_text_atomic(out / "table.txt", table + "\n")
    plot_labels(results, out / "labels.png")
    page = (f"<!doctype html><meta charset='utf-8'><title>bench-quality {html.escape(results['run'])}</title>"
            f"<h1>Quality benchmark {html.escape(results['run'])}</h1><p>{html.escape(results['machine'])}, "
            f"{html.escape(results['date'])}, wall time {results['wall_seconds']:.0f} s, data: "
            f"{html.escape(results['mode'])} of <code>{html.escape(results['data_dir'])}</code> "
            f"(fingerprint {results['data_fingerprint']})</p><pre>{html.escape(table)}</pre>"
            "<h2>Metric per label</h2><p><img src='labels.png' alt='per-label contributions'></p>"
            "<p>Every figure, config and stage time: <a href='results.json'>results.json</a>; held-out "
            "predictions: <code>predictions/</code>.</p>")
    write_text_atomic(out / "index.html", page)
    return table
