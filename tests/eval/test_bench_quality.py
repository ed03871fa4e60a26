"""The quality benchmark (bench/bench_quality.py, pe.eval.benchmark): its figures are the competition
metric's, its paired intervals behave as pairing should, and the whole benchmark runs end to end
on a tiny phantom with results.json matching the metric recomputed from the written predictions."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from pe import paths
from pe.data.tables import read_truth
from pe.eval import benchmark as bm
from pe.eval import metric
from pe.eval.benchmark_compare import KEYS, compare, parse_contrast, parse_side
from pe.eval.submission import read_submission, to_long
from pe.rspect import EXAM_LABELS, STUDY
from pe.synthetic.predictions import synthetic_calibrated


@pytest.fixture(scope="module")
def calibrated() -> tuple[pd.DataFrame, pd.DataFrame, metric.Scorer]:
    truth, image_df, exam_df = synthetic_calibrated(80, seed=3, min_images=20, max_images=40, noise=0.8)
    return truth, to_long(image_df, exam_df), metric.Scorer(truth)


def _shift(pred: pd.DataFrame, truth: pd.DataFrame, toward: float) -> pd.DataFrame:
    """Every prediction moved a share ``toward`` of the way to its true label (a uniformly better model)."""
    scorer = metric.Scorer(truth)
    ids = scorer.all_ids
    y = np.concatenate([scorer.image_truth, scorer.exam_truth.ravel()])
    p = pred.set_index("id")["label"].reindex(ids).to_numpy()
    return pd.DataFrame({"id": ids, "label": p + toward * (y - p)})


def test_parts_reproduce_the_competition_metric(calibrated) -> None:
    truth, pred, scorer = calibrated
    parts = bm.study_parts(scorer, pred)
    f = bm.figures(parts)
    bd = metric.score_breakdown(pred, truth)
    assert f["score"] == pytest.approx(metric.score(pred, truth), rel=1e-12)
    assert sum(f[f"loss:{lab}"] for lab in bm.LABELS) == pytest.approx(f["score"], rel=1e-12)
    for lab in bm.LABELS:
        assert f[f"loss:{lab}"] == pytest.approx(bd["labels"][lab]["loss"], rel=1e-10)
    assert f["study_pe_auc"] == pytest.approx(bd["study_pe_auc"], rel=1e-12)
    assert f["image_auc"] == pytest.approx(bd["image_auc"], rel=1e-12)
    # doubling every study is the same data; doubling some is a resample: pooled, not averaged
    assert bm.figures(parts, np.full(parts.n, 2.0))["score"] == pytest.approx(f["score"], rel=1e-12)
    w = np.zeros(parts.n)
    w[:10] = 1
    sub = metric.Scorer(truth, scorer.study_ids[:10])
    assert bm.figures(parts, w)["score"] == pytest.approx(sub.score(*sub.align(pred, allow_extra=True)), rel=1e-12)


def test_weighted_auc_matches_sklearn_with_ties_and_weights() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.3
    s = np.round(rng.random(500), 1)  # many ties
    w = rng.integers(0, 4, 500).astype(float)
    a = bm.WeightedAUC(y, s)
    assert a(w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), rel=1e-12)
    assert a() == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    assert math.isnan(a(np.where(y, 0.0, 1.0)))  # one class left


def test_paired_interval_sees_a_small_uniform_gain_that_unpaired_intervals_miss(calibrated) -> None:
    truth, pred, scorer = calibrated
    better = _shift(pred, truth, 0.03)
    a, b = bm.study_parts(scorer, better), bm.study_parts(scorer, pred)
    sa, sb = bm.figure_stat(a, "score"), bm.figure_stat(b, "score")
    diff = bm.ci(scorer.n_studies, bm.paired_difference([sa], [sb]), n_boot=400, seed=1)
    assert diff["estimate"] == pytest.approx(metric.score(better, truth) - metric.score(pred, truth), rel=1e-10)
    assert diff["low"] <= diff["estimate"] <= diff["high"] < 0  # the paired interval excludes 0
    ca, cb = (bm.ci(scorer.n_studies, s, n_boot=400, seed=1) for s in (sa, sb))
    assert ca["high"] > cb["low"] and cb["high"] > ca["low"]  # separately, the intervals overlap
    same = bm.ci(scorer.n_studies, bm.paired_difference([sb], [sb]), n_boot=50, seed=1)
    assert same["low"] == same["high"] == 0.0
    with pytest.raises(ValueError, match="same seeds"):
        bm.paired_difference([sa, sa], [sb])


def test_mean_over_seeds_and_spread() -> None:
    stats = [lambda w, k=k: float(k + w.sum()) for k in (1.0, 3.0)]
    assert bm.mean_over(stats)(np.ones(4)) == 6.0
    sp = bm.seed_spread([0.30, 0.34])
    assert sp["range"] == pytest.approx(0.04) and sp["sd"] == pytest.approx(0.04 / math.sqrt(2))


def test_holdout_view_is_stratified_seeded_and_complete(tmp_path: Path, calibrated) -> None:
    truth = calibrated[0]
    data = tmp_path / "data"
    for study in truth[STUDY].unique():
        (data / "train" / study / "series").mkdir(parents=True)
        (data / "train" / study / "series" / "1.dcm").write_bytes(b"x")
    truth.to_csv(data / "train.csv", index=False)
    held = bm.holdout_studies(truth, 0.25, seed=0)
    assert held == bm.holdout_studies(truth, 0.25, seed=0) != bm.holdout_studies(truth, 0.25, seed=1)
    exams = truth.drop_duplicates(STUDY).set_index(STUDY)
    neg = exams["negative_exam_for_pe"] > 0.5
    assert abs(neg[held].mean() - neg.mean()) < 0.1  # the held-out part keeps the PE share
    view, truth_file = bm.make_holdout_view(data, tmp_path / "view", 0.25, seed=0)
    assert sorted(p.name for p in (view / "test").iterdir()) == held
    assert len(list((view / "train").iterdir())) == truth[STUDY].nunique() - len(held)
    dcm = view / "test" / held[0] / "series" / "1.dcm"
    assert dcm.is_symlink() and dcm.resolve() == (data / "train" / held[0] / "series" / "1.dcm").resolve()
    assert set(read_truth(truth_file)[STUDY]) == set(held)
    assert not set(read_truth(view / "train.csv")[STUDY]) & set(held)
    with pytest.raises(bm.BenchError, match="share"):
        bm.holdout_studies(truth, 1.5, seed=0)


def test_variants_inherit_from_the_baseline_and_bad_files_are_named(tmp_path: Path) -> None:
    base = bm.load_variant("baseline")
    gru = bm.load_variant("gru_only")
    assert gru.cnn == base.cnn and gru.cnn_key() == base.cnn_key() and len(gru.seq) == 1
    assert bm.load_variant("cnn_maxpool").cnn_key() != base.cnn_key()
    vote = bm.load_variant("voting_head")
    assert (base.exam_pe_head, vote.exam_pe_head) == ("sequence", "voting") and vote.seq == base.seq
    vote_ll = bm.load_variant("voting_head_ll")
    assert vote_ll.exam_pe_head == "voting_log_loss" and vote_ll.cnn_key() == base.cnn_key()
    # every shipped variant's CNN (and the runs it builds on) reads the benchmark's frozen recipe, not demo.yaml,
    # so a demo edit never moves the benchmark's baseline or invalidates its stored runs
    for f in sorted(bm.BENCH_CONFIGS.glob("*.yaml")):
        v = bm.load_variant(f.stem)
        assert {v.cnn.config, *(b.spec.config for b in v.before)} == {"src/configs/bench_cnn_base.yaml"}, f.name
    n1 = bm.load_variant("cnn_n1")  # the 9-channel recipe, the baseline's until 2026-11-30 (session 17)
    assert n1.cnn_key() != base.cnn_key() and "neighbors=1" in n1.cnn.overrides
    assert yaml.safe_load((paths.REPO_ROOT / base.cnn.config).read_text())["neighbors"] == 0
    pos = bm.load_variant("attention_pos")
    att = bm.load_variant("attention")
    assert pos.cnn_key() not in (base.cnn_key(), att.cnn_key()) and pos.seq == base.seq
    assert set(pos.cnn.overrides) == {*att.cnn.overrides, "attention_negatives=false"}
    l3 = bm.load_variant("attention_l3")  # the attention variant on a finer map, nothing else changed
    assert set(l3.cnn.overrides) == {*att.cnn.overrides, "attention_layer=backbone.layer3"} and l3.seq == base.seq
    probs = bm.load_variant("seq_oof_probs")  # stage 2 only: the baseline's CNN training is shared
    assert probs.cnn_key() == base.cnn_key() and [m.config for m in probs.seq] == [m.config for m in base.seq]
    assert all("train_probs=oof" in m.overrides for m in probs.seq)
    (tmp_path / "baseline.yaml").write_text((bm.BENCH_CONFIGS / "baseline.yaml").read_text())
    (tmp_path / "bad.yaml").write_text("sequence: []\n")
    with pytest.raises(bm.BenchError, match=r"bad\.yaml: unknown key"):
        bm.load_variant("bad", tmp_path)
    with pytest.raises(bm.BenchError, match="no such variant"):
        bm.load_variant("nope", tmp_path)
    (tmp_path / "badhead.yaml").write_text("exam_pe_head: max\n")
    with pytest.raises(bm.BenchError, match=r"badhead\.yaml: exam_pe_head"):
        bm.load_variant("badhead", tmp_path)
    # runs a CNN builds on ("before"): part of its key; variants without them keep their old key
    text = (paths.REPO_ROOT / base.cnn.config).read_text() + "\n" + "\n".join(base.cnn.overrides)
    assert base.cnn_key() == hashlib.sha256(text.encode()).hexdigest()[:10] and base.before == ()
    hop = bm.load_variant("dual_hop")
    assert [(b.script, b.name) for b in hop.before] == [("04", "hop1")] and "hop1_exp=hop1" in hop.cnn.overrides
    lm = bm.load_variant("pretrain_landmarks")
    assert [(b.script, b.name) for b in lm.before] == [("13", "landmarks")]
    assert len({base.cnn_key(), hop.cnn_key(), lm.cnn_key()}) == 3
    (tmp_path / "bad2.yaml").write_text("cnn:\n  config: src/configs/demo.yaml\n  before: [{script: '99', name: x}]\n")
    with pytest.raises(bm.BenchError, match=r"bad2\.yaml: cnn.before\[0\]: needs script"):
        bm.load_variant("bad2", tmp_path)


def _bench_module(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    """bench/bench_quality.py as a module (registered in sys.modules: its dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location("bench_quality", paths.REPO_ROOT / "bench" / "bench_quality.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_quality", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_benchmark_end_to_end_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    mod = _bench_module(monkeypatch)
    out = tmp_path / "out"
    assert mod.main(["--tiny", "--in-process", "--quiet", "--seeds", "1", "--first-seed", "1", "--folds", "2",
                     "--variants", "gru_only", "voting_head", "--out", str(out), "--work-root", str(tmp_path / "wr"),
                     "--phantom-dir", str(tmp_path / "phantom")]) == 0
    r = json.loads((out / "results.json").read_text())
    # --first-seed 1: seed 1 only (fold seed 43, config seeds + 1), in its own run folder
    assert r["seeds"] == [1] and all(list(v["seeds"]) == ["1"] for v in r["variants"].values())
    cnn_cfg = yaml.safe_load(next((out / "runs").glob("cnn-*-s1/work/models/cnn/fold0/config.yaml")).read_text())
    assert cnn_cfg["seed"] == bm.config_seed(bm.load_variant("baseline").cnn) + 1
    assert not list((out / "runs").glob("cnn-*-s0"))
    truth = read_truth(tmp_path / "phantom" / "phantom_test_labels.csv")
    test_ids = pd.read_csv(tmp_path / "phantom" / "test.csv", dtype=str)
    assert r["n_heldout_studies"] == test_ids[STUDY].nunique()
    for name in ("baseline", "gru_only"):
        seed0 = r["variants"][name]["seeds"]["1"]
        pred = read_submission(out / seed0["predictions"])
        assert len(pred) == len(test_ids) + len(EXAM_LABELS) * test_ids[STUDY].nunique()
        bd = metric.score_breakdown(pred, truth)
        assert seed0["figures"]["score"]["estimate"] == pytest.approx(bd["score"], rel=1e-9)
        # ranking figures read the predictions before the hierarchy repair (it ties what it moves)
        raw = read_submission(seed0["predictions_before_repair"])
        bd_raw = metric.score_breakdown(raw, truth)
        assert seed0["figures"]["image_auc"]["estimate"] == pytest.approx(bd_raw["image_auc"], rel=1e-9)
        if not math.isnan(bd_raw["study_pe_auc"]):
            assert seed0["figures"]["study_pe_auc"]["estimate"] == pytest.approx(bd_raw["study_pe_auc"], rel=1e-9)
        # study-level calls: stage 2 at P(PE) > 0.5 on the determinate studies, recomputed here
        exam = raw[raw["id"].str.endswith("_negative_exam_for_pe")]
        p_neg = dict(zip(exam["id"].str.removesuffix("_negative_exam_for_pe"), exam["label"], strict=True))
        per_study = truth.groupby(STUDY).agg(pe=("pe_present_on_image", "max"), ind=("indeterminate", "max"))
        det = per_study[per_study["ind"] < 0.5]
        stats = metric.binary_stats(det["pe"].to_numpy(), np.array([p_neg[s] < 0.5 for s in det.index]))
        got = seed0["figures"]["call:f1"]["estimate"]
        assert (math.isnan(got) and math.isnan(stats["f1"])) or got == pytest.approx(stats["f1"], rel=1e-9)
        assert seed0["voting_rule"] is not None and seed0["voting_rule"]["mu"] >= 1
        assert "vote_call:f1" in seed0["figures"]
        f = seed0["figures"]  # the tiny phantom has boxes, so the pointing game is played
        # a constant map has no peak, so it is never a hit: the two shares add up to <= 1; a hit is also near
        assert 0 <= f["pointing_constant"]["estimate"] <= 1 - f["pointing"]["estimate"] + 1e-12
        assert f["pointing"]["estimate"] <= f["pointing_near"]["estimate"] <= 1 - f["pointing_constant"]["estimate"] + 1e-12
        lo, est, hi = (seed0["figures"]["score"][k] for k in ("low", "estimate", "high"))
        assert lo <= est <= hi
    # the voting head gives the exam PE rows: one probability per call (called / not called)
    seed0 = r["variants"]["voting_head"]["seeds"]["1"]
    raw = read_submission(seed0["predictions_before_repair"])
    spec = json.loads((out / "runs" / seed0["run"] / "oof" / "ens_voting_head" / "weights.json").read_text())
    neg = raw.loc[raw["id"].str.endswith("_negative_exam_for_pe"), "label"]
    assert set(neg.round(12)) <= {round(1 - spec["exam_pe_head"][k], 12) for k in ("p_pe_called", "p_pe_not_called")}
    d = r["paired"]["gru_only"]["score"]["estimate"]
    assert d == pytest.approx(r["variants"]["gru_only"]["mean"]["score"]["estimate"]
                              - r["variants"]["baseline"]["mean"]["score"]["estimate"], abs=1e-12)
    # the metric split by label: the paired per-label differences add up to the metric's difference
    parts = [r["paired"]["gru_only"][f"loss:{lab}"]["estimate"] for lab in bm.LABELS]
    assert sum(parts) == pytest.approx(d, abs=1e-12) and any(abs(x) > 0 for x in parts)
    assert r["stage_seconds"] and (out / "index.html").is_file() and (out / "labels.png").is_file()
    table = (out / "table.txt").read_text()
    assert "metric" in table
    assert "constant maps" in table and "px of a box" in table
    assert "metric by label" in table and "rv_lv_ratio_gte_1" in table
    # bench/compare_runs.py recomputes the same figures from the run folders, and its contrasts pair
    cmp = compare(tmp_path / "phantom" / "phantom_test_labels.csv",
                  [parse_side(f"base={out}:baseline"), parse_side(f"gru={out}:gru_only")], ["gru-base"], [1], n_boot=50)
    for key in KEYS:
        want = r["variants"]["baseline"]["seeds"]["1"]["figures"][key]["estimate"]
        got = cmp["figures"]["base"][key]["estimate"]
        assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, rel=1e-9), key
    assert cmp["contrasts"]["gru-base"]["score"]["estimate"] == pytest.approx(d, abs=1e-12)
    other = tmp_path / "other_truth.csv"  # a held-out set the runs did not predict is refused
    truth[truth[STUDY] != truth[STUDY].iloc[0]].to_csv(other, index=False)
    with pytest.raises(bm.BenchError, match="not the truth file's held-out set"):
        compare(other, [parse_side(f"base={out}")], [], [1], n_boot=10)
    with pytest.raises(bm.BenchError, match="unknown side"):
        compare(other, [parse_side(f"base={out}")], ["base-x"], [1], n_boot=10)
    # bench/compare_cams.py: a CNN compared with itself has its Grad-CAM maxima everywhere at the same pixel
    spec = importlib.util.spec_from_file_location("compare_cams", paths.REPO_ROOT / "bench" / "compare_cams.py")
    assert spec and spec.loader
    cams = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cams)
    run = out / "runs" / r["variants"]["baseline"]["seeds"]["1"]["run"]
    capsys.readouterr()
    assert cams.main(["--data", str(tmp_path / "phantom"), "--run", str(run), "--run", str(run), "--n", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    n, same, both = (int(v) for v in re.match(r"(\d+) slices: Grad-CAM maxima at the same pixel on (\d+) of the (\d+)",
                                                lines[0]).groups())
    constant = int(re.search(r"(\d+) constant maps", lines[1]).group(1))
    assert n > 0 and same == both == n - constant and lines[1].split(": ", 1)[1] == lines[2].split(": ", 1)[1]
    # --weights: the same run's EMA weights against the optimiser's raw ones, each line naming its weights
    assert cams.main(["--data", str(tmp_path / "phantom"), "--run", str(run), "--run", str(run), "--n", "6",
                      "--weights", "model", "--weights", "train_model"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(model): pointing game" in lines[1] and "(train_model): pointing game" in lines[2]


def test_call_rows_keep_their_columns_with_long_labels() -> None:
    """Three seeds' voting rules make a label longer than the default label column: it widens, so no number
    runs into its label (a 2-seed run printed 'voting (mu 1 delta 0.10, mu 1 delta 0.11)0.850')."""
    from pe.eval.benchmark_report import _call_lines

    cell = {"estimate": 0.5, "low": 0.25, "high": 0.75}
    mean = {f"{p}:{k}": cell for p in ("call", "maxagg_call", "vote_call") for k in bm.CALL_KEYS}
    seeds = {str(i): {"voting_rule": {"mu": 1, "delta": 0.1 * (i + 1)}} for i in range(3)}
    r = {"variants": {"baseline": {"mean": mean, "seeds": seeds}}}
    lines = _call_lines(r, {("cnn",): ["baseline"]}, 8)
    col = lines[2].index("sens")
    assert len(lines) == 6 and lines[5].lstrip().startswith("voting (mu 1 delta 0.10, mu 1 delta 0.20, mu 1")
    assert all(ln[col - 2:col] == "  " and ln[col:col + 5] == "0.500" for ln in lines[3:]), lines


def test_stage_markers_match_configs_by_bytes_not_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished stage is reused when its config file was renamed or copied byte for byte (the frozen CNN recipe),
    and rerun when the bytes, another argument or the data differ."""
    bq = _bench_module(monkeypatch)
    done = tmp_path / "s.done"
    cmd = ["python", "src/04_train_cnn.py", "--config", "src/configs/demo.yaml", "--fold", "0", "epochs=6"]
    done.write_text(json.dumps({"cmd": cmd, "configs": {"src/configs/demo.yaml": "aaa"}, "data": "d1"}))
    moved = [*cmd[:3], "src/configs/bench_cnn_base.yaml", *cmd[4:]]
    assert bq._same_key(done, {"cmd": moved, "configs": {"src/configs/bench_cnn_base.yaml": "aaa"}, "data": "d1"})
    assert bq._same_key(done, {"cmd": cmd, "configs": {"src/configs/demo.yaml": "aaa"}, "data": "d1"})
    assert not bq._same_key(done, {"cmd": moved, "configs": {"src/configs/bench_cnn_base.yaml": "bbb"}, "data": "d1"})
    assert not bq._same_key(done, {"cmd": [*moved[:-1], "epochs=8"], "configs": {"src/configs/bench_cnn_base.yaml": "aaa"},
                                   "data": "d1"})
    assert not bq._same_key(done, {"cmd": moved, "configs": {"src/configs/bench_cnn_base.yaml": "aaa"}, "data": "d2"})
    done.write_text("not json")
    assert not bq._same_key(done, {"cmd": cmd, "configs": {"src/configs/demo.yaml": "aaa"}, "data": "d1"})


def test_ranking_figures_read_the_beliefs_and_the_metric_the_repaired_submission(calibrated) -> None:
    """The repair moves values to the 0.5 boundary and ties every exam it moves; ``ranked_by`` keeps
    the metric of the repaired set and the AUCs of the beliefs; call_stats matches binary_stats."""
    from pe.eval.hierarchy import repair_long

    truth, pred, scorer = calibrated
    repaired, _ = repair_long(pred, truth[[STUDY, "SOPInstanceUID"]])
    rep, raw = bm.study_parts(scorer, repaired), bm.study_parts(scorer, pred)
    both = bm.ranked_by(rep, raw)
    f, f_rep, f_raw = bm.figures(both), bm.figures(rep), bm.figures(raw)
    assert f["score"] == f_rep["score"] != f_raw["score"]
    assert f["study_pe_auc"] == f_raw["study_pe_auc"] and f["image_auc"] == f_raw["image_auc"]
    assert f_rep["study_pe_auc"] != f_raw["study_pe_auc"]  # the repair's ties changed the ranking
    first = truth[STUDY].iloc[0]
    smaller = truth[truth[STUDY] != first]
    keep = ~pred["id"].isin([*truth.loc[truth[STUDY] == first, "SOPInstanceUID"],
                             *(f"{first}_{lab}" for lab in EXAM_LABELS)])
    with pytest.raises(ValueError, match="aligned"):
        bm.ranked_by(rep, bm.study_parts(metric.Scorer(smaller), pred[keep]))
    y, det = bm.study_truth(raw)
    called = raw.exam_prob[:, EXAM_LABELS.index("negative_exam_for_pe")] < 0.5
    ref = metric.binary_stats(y[det], called[det])
    w = np.ones(raw.n)
    for k, st in bm.call_stats(raw, called).items():
        assert st(w) == pytest.approx(ref[k], rel=1e-12), k
    w2 = np.zeros(raw.n)
    w2[:10] = 2.0  # a resample: studies counted with multiplicity
    sub = metric.binary_stats(np.repeat(y[:10][det[:10]], 2), np.repeat(called[:10][det[:10]], 2))
    assert bm.call_stats(raw, called)["f1"](w2) == pytest.approx(sub["f1"], nan_ok=True)


@pytest.mark.slow
def test_benchmark_variants_that_build_on_other_runs_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dual_hop (hop 1 trained first on every fold, then hop 2 on it) and pretrain_landmarks (stage 13
    once, then the CNN from its backbone) run through the benchmark at the tiny scale."""
    mod = _bench_module(monkeypatch)
    out = tmp_path / "out"
    assert mod.main(["--tiny", "--in-process", "--quiet", "--seeds", "1", "--folds", "2", "--variants", "dual_hop",
                     "pretrain_landmarks", "--out", str(out), "--work-root", str(tmp_path / "wr"),
                     "--phantom-dir", str(tmp_path / "phantom"), "--n-boot", "50"]) == 0
    r = json.loads((out / "results.json").read_text())
    for name, made in (("dual_hop", ["hop1/fold0/best.pt", "hop1/fold1/best.pt"]),
                       ("pretrain_landmarks", ["landmarks/backbone.pt", "landmarks/summary.json"])):
        seed0 = r["variants"][name]["seeds"]["0"]
        models = out / "runs" / seed0["run"] / "work" / "models"
        assert all((models / m).is_file() for m in made), name
        cfg = yaml.safe_load((models / "cnn" / "fold0" / "config.yaml").read_text())
        assert cfg["hop1_exp" if name == "dual_hop" else "init_from"] == made[0].split("/")[0]
        assert name in r["paired"] and math.isfinite(seed0["figures"]["score"]["estimate"])
    # hop 1 has the baseline CNN's recipe and seed: copied from the baseline's run folder, not trained again
    base = out / "runs" / r["variants"]["baseline"]["seeds"]["0"]["run"] / "work" / "models" / "cnn"
    hop1 = out / "runs" / r["variants"]["dual_hop"]["seeds"]["0"]["run"] / "work" / "models" / "hop1"
    for k in range(2):
        assert (hop1 / f"fold{k}" / "best.pt").read_bytes() == (base / f"fold{k}" / "best.pt").read_bytes()
    assert not any(":hop1:" in name and "04_train_cnn" in name for name in r["stage_seconds"])
    assert sum(":hop1:" in name and "04_reuse_cnn" in name for name in r["stage_seconds"]) == 2


def test_a_copied_model_needs_the_same_folds_and_is_copied_again_when_its_source_reran(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy stage (hop 1 reused from another run folder) refuses folds that differ from its source's,
    and runs again, with what follows it, when its source run folder's stages ran again."""
    mod = _bench_module(monkeypatch)
    src, dst = tmp_path / "runA", tmp_path / "runB"
    for r in (src, dst):
        (r / "work").mkdir(parents=True)
        (r / "work" / "folds.csv").write_text("StudyInstanceUID,fold\n1.2,0\n")
    (src / "work/models/cnn/fold0").mkdir(parents=True)
    (src / "work/models/cnn/fold0/best.pt").write_bytes(b"weights-1")
    fold_src, fold_dst = src / "work/models/cnn/fold0", dst / "work/models/hop1/fold0"
    copy = mod.Stage("runB/04_reuse_cnn:hop1:fold0", ["copy", str(fold_src), str(fold_dst)], None, "03",
                     copy=(src, fold_src, dst, fold_dst), after="runA")
    train = mod.Stage("runA/04", [sys.executable, "-c", "pass"], None, "04")

    copy_log = tmp_path / "logs" / "runB_04_reuse_cnn_hop1_fold0.log"  # written only when the stage runs

    def copied(*stages) -> bool:
        copy_log.unlink(missing_ok=True)
        runner = mod.Runner(tmp_path / "logs", total=10.0, quiet=True)
        for st in stages:
            runner.run(st)
        return copy_log.is_file() and "copied" in copy_log.read_text()

    assert copied(train, copy) and (fold_dst / "best.pt").read_bytes() == b"weights-1"
    assert not copied(train, copy)  # resumed: nothing changed
    (src / "work/models/cnn/fold0/best.pt").write_bytes(b"weights-2")
    (tmp_path / "logs" / "runA_04.done").unlink()  # the source's stage runs again ...
    assert copied(train, copy) and (fold_dst / "best.pt").read_bytes() == b"weights-2"  # ... and so the copy
    (dst / "work" / "folds.csv").write_text("StudyInstanceUID,fold\n1.2,1\n")
    (tmp_path / "logs" / "runB_04_reuse_cnn_hop1_fold0.done").unlink()
    with pytest.raises(RuntimeError, match="not the same folds"):
        copied(copy)


def test_resume_reruns_a_stage_whose_config_changed_and_everything_after_it(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage is skipped on resume only when its command and the contents of the YAML files it names
    are unchanged; once a stage of a run folder runs again, the later stages of that folder do too."""
    mod = _bench_module(monkeypatch)
    cfg = tmp_path / "member.yaml"
    cfg.write_text("epochs: 2\n")
    stages = [mod.Stage("run1/06", [sys.executable, "-c", "pass", str(cfg)], None, "06"),
              mod.Stage("run1/07", [sys.executable, "-c", "pass"], None, "07"),
              mod.Stage("run2/07", [sys.executable, "-c", "pass"], None, "07")]

    def ran(change: bool = False, data: str = "d1") -> list[bool]:
        if change:
            cfg.write_text("epochs: 3\n")
        runner = mod.Runner(tmp_path / "logs", total=10.0, quiet=True)
        runner.data_key = data
        for st in stages:
            runner.run(st)
        return [runner.seconds[st.name] > 0 for st in stages]

    assert ran() == [True, True, True]
    assert ran() == [False, False, False]  # same commands, same config bytes: resumed
    assert ran(change=True) == [True, True, False]  # the edited config, then what follows in its folder
    assert ran(data="d2") == [True, True, True]  # other data (same commands): nothing is reused


def test_data_key_tells_folders_with_the_same_labels_but_other_images_apart(tmp_path: Path) -> None:
    """The shortcut phantom has the ordinary phantom's labels and test split; only training images
    differ. The benchmark's prepared data and resume markers must not be shared between them."""
    from pe.eval.data_signature import image_signature

    for name, pixel in (("a", b"1"), ("b", b"1"), ("c", b"22")):
        for split in ("train", "test"):
            f = tmp_path / name / split / "s1" / "x.dcm"
            f.parent.mkdir(parents=True)
            f.write_bytes(pixel)
            os.utime(f, ns=(10**18, 10**18))
    sig = {n: image_signature(tmp_path / n) for n in "abc"}
    assert sig["a"] == sig["b"] != sig["c"]


def test_compare_sides_and_contrasts_parse_and_bad_ones_are_named() -> None:
    s = parse_side("plain_sc=reports/x/shortcut-3:attention")
    assert (s.name, s.out, s.variant) == ("plain_sc", Path("reports/x/shortcut-3"), "attention")
    assert parse_side("a=out").variant == "baseline"
    names = ["a", "b", "c", "d"]
    assert parse_contrast("a-b-c+d", names) == [(1, "a"), (-1, "b"), (-1, "c"), (1, "d")]
    assert parse_contrast("-a + b", names) == [(-1, "a"), (1, "b")]
    for bad, msg in (("a*b", "expected names"), ("a-e", "unknown side"), ("", "expected names")):
        with pytest.raises(bm.BenchError, match=msg):
            parse_contrast(bad, names)
    with pytest.raises(bm.BenchError, match="NAME=OUT_DIR"):
        parse_side("1x=out")


def test_progress_bar_survives_more_work_than_estimated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage the cost estimate missed once crashed a finished run in tqdm ({total:.0f} of None)."""
    mod = _bench_module(monkeypatch)
    runner = mod.Runner(tmp_path / "logs", total=3.0, quiet=False)
    for _ in range(3):
        runner.advance(2.0)
    assert runner.bar.n == pytest.approx(3.0) and runner.bar.total == pytest.approx(3.0)
    assert "3/3" in str(runner.bar)
