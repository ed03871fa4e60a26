"""OOF ensembling (pe/eval/ensemble.py, src/07_ensemble.py) on synthetic members with known noise."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pe import paths, rspect
from pe.eval import ensemble, metric
from pe.eval.pred_files import PredictionFileError
from pe.ids import exam_row_id

SCRIPT = Path(__file__).resolve().parents[2] / "src" / "07_ensemble.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("ensemble_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def synthetic_truth(n_studies: int, seed: int) -> pd.DataFrame:
    """train.csv-shaped truth obeying the label hierarchy: ~40 % positive exams with a run of
    positive slices, sub-labels drawn consistently."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_studies):
        study = f"{s:012x}"
        n = int(rng.integers(20, 40))
        pos = rng.random() < 0.4
        img = np.zeros(n, dtype=int)
        ex = dict.fromkeys(rspect.EXAM_LABELS, 0)
        ex.update(dict.fromkeys(rspect.INFO_LABELS, 0))
        if pos:
            a = int(rng.integers(0, n - 5))
            img[a:a + int(rng.integers(2, 6))] = 1
            ex["rv_lv_ratio_gte_1" if rng.random() < 0.4 else "rv_lv_ratio_lt_1"] = 1
            for lab in rspect.LOCATION_LABELS:
                ex[lab] = int(rng.random() < 0.5)
            if not any(ex[lab] for lab in rspect.LOCATION_LABELS):
                ex["rightsided_pe"] = 1
            r = rng.random()
            if r < 0.15:
                ex["chronic_pe"] = 1
            elif r < 0.3:
                ex["acute_and_chronic_pe"] = 1
        else:
            ex["indeterminate" if rng.random() < 0.1 else "negative_exam_for_pe"] = 1
        for i in range(n):
            rows.append({rspect.STUDY: study, rspect.SERIES: f"{s + 1}.1", rspect.SOP: f"{s + 1}.{i + 1}",
                         rspect.IMAGE_LABEL: img[i], **ex})
    return pd.DataFrame(rows)[list(rspect.TRAIN_COLUMNS)]


def truth_long(truth: pd.DataFrame) -> pd.DataFrame:
    """The truth in submission shape (id, y) and each row's study."""
    img = pd.DataFrame({"id": truth[rspect.SOP], "y": truth[rspect.IMAGE_LABEL], "study": truth[rspect.STUDY]})
    ex = truth.drop_duplicates(rspect.STUDY)
    exam = [pd.DataFrame({"id": [exam_row_id(s, lab) for s in ex[rspect.STUDY]], "y": ex[lab].to_numpy(),
                          "study": ex[rspect.STUDY].to_numpy()}) for lab in rspect.EXAM_LABELS]
    return pd.concat([img, *exam], ignore_index=True)


def noisy_member(y: np.ndarray, noise: float, rng: np.random.Generator, signal: float = 2.0) -> np.ndarray:
    """Probabilities whose logit is ±signal plus Gaussian noise of the given sd."""
    z = signal * (2 * y - 1) + noise * rng.standard_normal(len(y))
    return 1 / (1 + np.exp(-z))


def write_member(oof_root: Path, name: str, long: pd.DataFrame, p: np.ndarray, folds: pd.Series,
                 test_ids: list[str], rng: np.random.Generator, n_folds: int) -> None:
    d = oof_root / name
    d.mkdir(parents=True, exist_ok=True)
    fold_of_row = long["study"].map(folds).to_numpy()
    for k in range(n_folds):
        m = fold_of_row == k
        pd.DataFrame({"id": long["id"][m], "label": p[m]}).to_csv(d / f"fold{k}.csv", index=False)
        pd.DataFrame({"id": test_ids, "label": rng.random(len(test_ids))}).to_csv(d / f"test_fold{k}.csv", index=False)


def make_blend_data(noises: list[float], n_studies: int = 120, seed: int = 0, n_folds: int = 4):
    truth = synthetic_truth(n_studies, seed)
    long = truth_long(truth)
    rng = np.random.default_rng(seed + 1)
    studies = truth[rspect.STUDY].unique()
    folds = pd.Series(np.arange(len(studies)) % n_folds, index=studies)
    oofs = {}
    for j, noise in enumerate(noises):
        p = noisy_member(long["y"].to_numpy(), noise, rng)
        oofs[f"m{j}"] = pd.DataFrame({"id": long["id"], "label": p, "fold": long["study"].map(folds).to_numpy()})
    return truth, long, folds, oofs


def test_groups_cover_every_scored_label_once() -> None:
    labels = [lab for labs in ensemble.GROUPS.values() for lab in labs]
    assert sorted(labels) == sorted((rspect.IMAGE_LABEL, *rspect.EXAM_LABELS))


def test_blend_data_carries_the_metric_rows() -> None:
    """Row weights: IMAGE_WEIGHT * share of positive images of the exam, exam rows their label
    weight; a member's loss computed from them equals pe.eval.metric.score."""
    truth, long, _, oofs = make_blend_data([1.0], n_studies=30)
    data = ensemble.align_members(oofs, truth)
    assert set(data.ids) == set(long["id"]) and len(data.ids) == len(long)
    y = long.set_index("id").loc[data.ids, "y"].to_numpy()
    np.testing.assert_array_equal(data.y, y)
    img = data.groups == "image"
    q = truth.groupby(rspect.STUDY)[rspect.IMAGE_LABEL].mean()
    np.testing.assert_allclose(data.rw[img], rspect.IMAGE_WEIGHT * q.loc[data.study[img]].to_numpy())
    assert np.isclose(data.rw[~img].sum(), truth[rspect.STUDY].nunique())  # the nine weights sum to 1
    ours = ensemble.weighted_loss(data.y, data.P[:, 0], data.rw) / data.total_weight
    theirs = metric.score(pd.DataFrame({"id": data.ids, "label": data.P[:, 0]}), truth)
    assert ours == pytest.approx(theirs, rel=1e-12)


@pytest.mark.parametrize("mode", ensemble.MODES)
def test_fit_weights_stay_on_the_simplex_and_prefer_the_clean_member(mode: str) -> None:
    rng = np.random.default_rng(5)
    y = (rng.random(4000) < 0.3).astype(float)
    X = ensemble.to_space(np.column_stack([noisy_member(y, 0.5, rng), noisy_member(y, 4.0, rng)]), mode)
    w = ensemble.fit_weights(X, y, np.ones_like(y), mode)
    assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    assert w[0] > 0.8


def test_blend_of_two_independent_members_beats_each() -> None:
    truth, _, _, oofs = make_blend_data([1.5, 1.5], n_studies=150)
    fit = ensemble.fit_ensemble(ensemble.align_members(oofs, truth))
    best_member = min(fit.scores["members/m0"], fit.scores["members/m1"])
    assert fit.scores["final"] < best_member - 0.005


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_fitted_blend_never_much_worse_than_best_member(seed: int) -> None:
    """A good member plus two poor ones: the held-out (cross-fitted) score of the blend must stay
    within noise of the best member, i.e. the fitted weights do not overfit onto the poor ones."""
    truth, _, _, oofs = make_blend_data([1.0, 3.0, 6.0], n_studies=80, seed=seed)
    data = ensemble.align_members(oofs, truth)
    fit = ensemble.fit_ensemble(data)
    best_member = min(fit.scores[f"members/m{j}"] for j in range(3))
    assert fit.scores["final"] <= best_member + 0.01
    for mode in ensemble.MODES:  # in-sample is optimistic: never above the cross-fitted estimate
        assert fit.scores[f"{mode}_in_sample"] <= fit.scores[f"{mode}_cross_fitted"] + 1e-9
    assert fit.weights["image"]["m0"] > fit.weights["image"]["m2"]


def test_blend_long_reproduces_fitted_weights_and_checks_members() -> None:
    truth, _, _, oofs = make_blend_data([1.0, 2.0], n_studies=40)
    data = ensemble.align_members(oofs, truth)
    fit = ensemble.fit_ensemble(data)
    spec = fit.to_json(data.members)
    frames = {n: f[["id", "label"]] for n, f in oofs.items()}
    out = ensemble.blend_long(frames, spec)
    got = out.set_index("id").loc[data.ids, "label"].to_numpy()
    X = ensemble.to_space(data.P, spec["mode"])
    for g, gs in spec["groups"].items():
        gm = data.groups == g
        w = np.array([gs["weights"][n] for n in data.members])
        np.testing.assert_allclose(got[gm], ensemble.blend(X[gm], w, spec["mode"]))
    with pytest.raises(ensemble.EnsembleError, match="m1"):
        ensemble.blend_long({"m0": frames["m0"]}, spec)
    shuffled = {n: f.sample(frac=1, random_state=0) for n, f in frames.items()}
    pd.testing.assert_frame_equal(ensemble.blend_long(shuffled, spec).set_index("id").loc[out["id"]].reset_index(),
                                  out, check_exact=False)


def test_align_members_rejects_different_id_sets() -> None:
    truth, _, _, oofs = make_blend_data([1.0, 2.0], n_studies=10)
    oofs["m1"] = oofs["m1"].iloc[1:]
    with pytest.raises(ensemble.EnsembleError, match=r"member m1 .*id set differs"):
        ensemble.align_members(oofs, truth)


def test_read_member_oof_rejects_an_id_in_two_folds(tmp_path: Path) -> None:
    d = tmp_path / "exp"
    d.mkdir()
    pd.DataFrame({"id": ["a", "b"], "label": [0.1, 0.2]}).to_csv(d / "fold0.csv", index=False)
    pd.DataFrame({"id": ["b", "c"], "label": [0.1, 0.2]}).to_csv(d / "fold1.csv", index=False)
    with pytest.raises(PredictionFileError, match="more than one fold"):
        ensemble.read_member_oof(d)
    pd.DataFrame({"id": ["c", "c"], "label": [0.1, 0.2]}).to_csv(d / "fold1.csv", index=False)
    with pytest.raises(PredictionFileError, match=r"fold1\.csv: 1 duplicated"):
        ensemble.read_member_oof(d)
    pd.DataFrame({"id": ["c"], "label": [1.5]}).to_csv(d / "fold1.csv", index=False)
    with pytest.raises(PredictionFileError, match="not finite in"):
        ensemble.read_member_oof(d)


def test_script_writes_blend_weights_and_stage_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth, long, folds, _ = make_blend_data([1.0], n_studies=60, n_folds=3)
    truth_path = tmp_path / "train.csv"
    truth.to_csv(truth_path, index=False)
    rng = np.random.default_rng(9)
    test_ids = ["9.1", "9.2", *[exam_row_id("ffffffffffff", lab) for lab in rspect.EXAM_LABELS]]
    oof_root = paths.oof_dir()
    for name, noise in (("seq_a", 1.0), ("seq_b", 1.5)):
        write_member(oof_root, name, long, noisy_member(long["y"].to_numpy(), noise, rng), folds, test_ids, rng, 3)
    rc = _load_script().main(["--members", "seq_a", "seq_b", "--out", "ens", "--truth", str(truth_path)])
    assert rc == 0
    out_dir = oof_root / "ens"
    oof = pd.read_csv(out_dir / "oof.csv", dtype={"id": str})
    assert set(oof["id"]) == set(long["id"]) and oof["id"].is_unique
    test = pd.read_csv(out_dir / "test.csv", dtype={"id": str})
    assert list(test["id"]) == test_ids
    spec = json.loads((out_dir / "weights.json").read_text())
    assert spec["members"] == ["seq_a", "seq_b"]
    for gs in spec["groups"].values():
        assert sum(gs["weights"].values()) == pytest.approx(1.0)
    # test.csv = the fold-averaged members blended with the written weights
    members = {n: ensemble.read_member_test(oof_root / n, spec["mode"]) for n in spec["members"]}
    np.testing.assert_allclose(ensemble.blend_long(members, spec)["label"], test["label"], atol=1e-12)
    stages = json.loads((out_dir / "stages.json").read_text())
    names = [r["stage"] for r in stages["rows"]]
    assert names[0].startswith("prior") and "member seq_a" in names and names[-1].startswith("ensemble + repair")
    printed = capsys.readouterr().out
    assert "OOF metric" in printed and "seq_b" in printed
    by_name = {r["stage"]: r["oof_metric"] for r in stages["rows"]}
    assert by_name["member seq_a"] < by_name[names[0]]  # a member with signal beats the prior
