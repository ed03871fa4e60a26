"""The HTML report: built from small fixtures, every image it references exists, its tables hold the
numbers src/09_score.py prints, and (on the phantom, with a tiny CNN) the explanation section runs
with the pointing game."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pe import paths
from pe.eval import metric
from pe.report.evaluation import choose_studies, evaluate, per_study_loss
from pe.report.plots import expected_calibration_error
from pe.rspect import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY, TRAIN_COLUMNS

SRC = Path(__file__).resolve().parents[2] / "src"




# --- fixtures -----------------------------------------------------------------------------------
def synthetic_truth(n_studies: int = 14, seed: int = 0) -> pd.DataFrame:
    """train.csv-shaped truth obeying the RSPECT hierarchy: half the studies positive with one run
    of positive slices, the rest negative (one indeterminate)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_studies):
        study, series = f"1.2.840.{s + 1}", f"1.2.841.{s + 1}"
        n = int(rng.integers(8, 20))
        positive = s % 2 == 0
        exam = dict.fromkeys(EXAM_LABELS, 0)
        img = np.zeros(n, dtype=int)
        if positive:
            a = int(rng.integers(0, n - 3))
            img[a:a + int(rng.integers(2, 5))] = 1
            exam["rv_lv_ratio_gte_1" if rng.random() < 0.4 else "rv_lv_ratio_lt_1"] = 1
            for loc in ("central_pe", "rightsided_pe", "leftsided_pe"):
                exam[loc] = int(rng.random() < 0.5)
            exam["rightsided_pe"] |= int(not any(exam[k] for k in ("central_pe", "leftsided_pe")))
            r = rng.random()
            exam["chronic_pe"], exam["acute_and_chronic_pe"] = int(r < 0.2), int(0.2 <= r < 0.4)
        elif s == 1:
            exam["indeterminate"] = 1
        else:
            exam["negative_exam_for_pe"] = 1
        for j in range(n):
            row = {STUDY: study, "SeriesInstanceUID": series, SOP: f"1.2.842.{s + 1}.{j + 1}",
                   IMAGE_LABEL: int(img[j]), "qa_motion": 0, "qa_contrast": 0, "flow_artifact": 0,
                   "true_filling_defect_not_pe": 0, **exam}
            rows.append(row)
    return pd.DataFrame(rows)[list(TRAIN_COLUMNS)]


def noisy_predictions(truth: pd.DataFrame, seed: int = 1) -> pd.DataFrame:
    """A submission-shaped prediction that is informative but imperfect (and breaks some rules)."""
    rng = np.random.default_rng(seed)
    img = np.clip(0.1 + 0.6 * truth[IMAGE_LABEL].to_numpy() + rng.normal(0, 0.15, len(truth)), 0.01, 0.99)
    exams = truth.drop_duplicates(STUDY)
    ids, labels = list(truth[SOP]), list(img)
    for label in EXAM_LABELS:
        p = np.clip(0.2 + 0.5 * exams[label].to_numpy() + rng.normal(0, 0.2, len(exams)), 0.01, 0.99)
        ids += [f"{s}_{label}" for s in exams[STUDY]]
        labels += list(p)
    return pd.DataFrame({"id": ids, "label": labels})


class _Tables(HTMLParser):
    """Tables of an HTML page by id: list of rows, each a list of cell texts; plus every <img src>."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._tid: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._tid = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._tid] = []
        elif tag == "tr" and self._tid:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(str(a["src"]))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._tid:
            self.tables[self._tid].append(self._row)
            self._row = None
        elif tag == "table":
            self._tid = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse_report(index: Path) -> _Tables:
    p = _Tables()
    p.feed(index.read_text())
    return p


def _breakdown_of(score_json: dict) -> dict:
    """09_score's JSON: the breakdown dict itself or nested under one key."""
    if "labels" in score_json:
        return score_json
    for v in score_json.values():
        if isinstance(v, dict) and "labels" in v:
            return v
    raise AssertionError(f"no per-label breakdown in 09_score JSON keys {sorted(score_json)}")


def _num(text: str) -> float:
    return float("nan") if text == "n/a" else float(text)


def check_metric_table(tables: _Tables, bd: dict, column: str = "oof") -> None:
    """Every per-label loss, weight and AUC and the total score of ``bd`` appear in the report's
    metric table (to the table's 6 decimals)."""
    rows = tables.tables["metric-table"]
    header, body = rows[0], {r[0]: r for r in rows[1:]}
    c_loss, c_auc, c_w = header.index(f"loss ({column})"), header.index(f"AUC ({column})"), header.index("weight")
    assert set(bd["labels"]) == {k for k in body if k != "score (total)"}
    for label, v in bd["labels"].items():
        assert _num(body[label][c_loss]) == pytest.approx(v["loss"], abs=6e-7), label
        assert _num(body[label][c_w]) == pytest.approx(v["weight"], abs=6e-7), label
        if np.isnan(v["auc"]):
            assert body[label][c_auc] == "n/a"
        else:
            assert _num(body[label][c_auc]) == pytest.approx(v["auc"], abs=6e-7), label
    assert _num(body["score (total)"][c_loss]) == pytest.approx(bd["score"], abs=6e-7)


# --- unit tests ---------------------------------------------------------------------------------
def test_per_study_loss_is_the_metric_on_each_study_alone() -> None:
    truth = synthetic_truth(8)
    pred = noisy_predictions(truth)
    ev = evaluate(pred, truth, prior=False, repair=False)
    losses = per_study_loss(ev.scorer, ev.image_probs, ev.exam_probs)
    for i, study in enumerate(ev.scorer.study_ids):
        t = truth[truth[STUDY] == study]
        p = pred[pred["id"].isin(set(t[SOP])) | pred["id"].str.startswith(f"{study}_")]
        assert losses[i] == pytest.approx(metric.score(p, t), rel=1e-12)
    chosen = choose_studies(ev, losses, 4)
    kinds = [k for _, k in chosen]
    assert kinds == ["best", "best", "worst", "worst"]
    best_idx = [i for i, k in chosen if k == "best"]
    pe = ev.scorer.q > 0
    assert all(pe[i] for i in best_idx)
    assert losses[chosen[2][0]] == losses.max()


def test_expected_calibration_error_known_values() -> None:
    # Perfectly calibrated bins → 0; all predictions 0.9 with frequency 0.5 → 0.4.
    assert expected_calibration_error(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0)
    assert expected_calibration_error(np.array([0, 1]), np.array([0.9, 0.9])) == pytest.approx(0.4)


# --- the report from synthetic fixtures ----------------------------------------------------------
def _write_synthetic_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exp: str) -> tuple[Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("PE_DATA_DIR", str(data))
    truth = synthetic_truth()
    truth.to_csv(data / "train.csv", index=False)
    oof = paths.exp_oof_dir(exp)
    oof.mkdir(parents=True, exist_ok=True)
    noisy_predictions(truth).to_csv(oof / "oof.csv", index=False)
    return data / "train.csv", oof / "oof.csv"


def test_report_tables_hold_the_numbers_09_score_prints(load_script, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    truth_csv, oof_csv = _write_synthetic_experiment(tmp_path, monkeypatch, "ens_syn")
    out = tmp_path / "report"
    assert load_script("10_report.py").main(["--exp", "ens_syn", "--out", str(out), "--n-studies", "4"]) == 0
    index = out / "index.html"
    assert index.is_file()
    tables = parse_report(index)
    assert {"roc.png", "calibration.png", "slices.png"} <= set(tables.images)
    for src in tables.images:
        assert not src.startswith(("/", "http")), src  # relative links: the folder opens offline anywhere
        assert (out / src).is_file() and (out / src).stat().st_size > 1000, src

    score_json = tmp_path / "score.json"
    capsys.readouterr()
    assert load_script("09_score.py").main(["--submission", str(oof_csv), "--truth", str(truth_csv),
                                        "--json", str(score_json)]) == 0
    printed = capsys.readouterr().out
    bd = _breakdown_of(json.loads(score_json.read_text()))
    printed_score = float(re.findall(r"^score: (\S+)$", printed, flags=re.M)[-1])
    assert bd["score"] == pytest.approx(printed_score, abs=1e-6)
    check_metric_table(tables, bd, "oof")

    # Sensitivity etc. at 0.5 for exam PE and images, as 09_score computes them.
    stats = {(r[0], r[1]): r for r in tables.tables["stats-table"][1:]}
    for level, key in (("exam PE", "exam_pe_at_0.5"), ("image", "image_at_0.5")):
        row = stats[("oof", level)]
        for j, k in enumerate(("sensitivity", "specificity", "ppv", "npv", "f1")):
            assert _num(row[2 + j]) == pytest.approx(bd[key][k], abs=6e-7), (level, k)
    auc_row = stats[("oof", "AUC (study PE / image)")]
    assert _num(auc_row[2]) == pytest.approx(bd["study_pe_auc"], abs=6e-7)
    assert _num(auc_row[3]) == pytest.approx(bd["image_auc"], abs=6e-7)

    # The repaired and prior columns hold their own breakdowns; the prior is worse than the model.
    summary = json.loads((out / "report.json").read_text())
    check_metric_table(tables, summary["breakdowns"]["repaired"], "repaired")
    check_metric_table(tables, summary["breakdowns"]["prior"], "prior")
    assert summary["breakdowns"]["prior"]["score"] > summary["breakdowns"]["oof"]["score"]
    assert len(summary["slice_curves"]) == 4
    # No CNN in this fixture: the report says why there are no maps instead of failing.
    assert any("explanation maps skipped" in n for n in summary["notes"])


def test_report_fails_clearly_without_predictions(load_script, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _write_synthetic_experiment(tmp_path, monkeypatch, "ens_syn")
    assert load_script("10_report.py").main(["--exp", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "no oof.csv" in capsys.readouterr().err


def test_report_is_written_and_exit_code_is_1_when_the_maps_fail(load_script, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    truth_csv, _ = _write_synthetic_experiment(tmp_path, monkeypatch, "ens_syn")
    studies = pd.read_csv(truth_csv, dtype={STUDY: str})[STUDY].unique()
    paths.folds_path().parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({STUDY: studies, "fold": np.arange(len(studies)) % 2}).to_csv(paths.folds_path(), index=False)
    for k in (0, 1):
        paths.run_dir("broken", k).mkdir(parents=True, exist_ok=True)
        (paths.run_dir("broken", k) / "best.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "r"
    assert load_script("10_report.py").main(["--exp", "ens_syn", "--cnn-exp", "broken", "--out", str(out)]) == 1
    summary = json.loads((out / "report.json").read_text())
    assert "best.pt" in summary["explain_error"] or "checkpoint" in summary["explain_error"].lower()
    assert "failed" in (out / "index.html").read_text()
    assert (out / "roc.png").is_file()


# --- explanation maps on the phantom with a tiny random CNN ---------------------------------------
@pytest.mark.slow
def test_report_explains_phantom_slices_with_fold_models(load_script, phantom_dir: Path, phantom_meta: dict[str, Path],
                                                         phantom_cache: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import torch

    from pe.config import CNNConfig, to_dict
    from pe.data.folds import make_folds
    from pe.models.slice_cnn import build_model

    torch.manual_seed(0)
    monkeypatch.setenv("PE_DATA_DIR", str(phantom_dir))
    paths.meta_path("train").parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(phantom_meta["train"], paths.meta_path("train"))
    meta = pd.read_parquet(phantom_meta["train"])
    folds = make_folds(meta, n_folds=2, seed=0)
    folds.to_csv(paths.folds_path(), index=False)
    cfg = CNNConfig(name="tiny", backbone="test_resnet", pretrained=False, img_size=64, neighbors=1,
                    crop_lung=True, cache_dir=str(phantom_cache), cache_size=128)
    truth = pd.read_csv(phantom_dir / "train.csv", dtype={STUDY: str, SOP: str})
    rng = np.random.default_rng(0)
    for k in (0, 1):
        model = build_model(cfg)
        run = paths.run_dir("tiny", k)
        run.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "config": to_dict(cfg), "epoch": 0}, run / "best.pt")
        val = truth[truth[STUDY].isin(set(folds.loc[folds["fold"] == k, STUDY]))]
        cnn_oof = pd.DataFrame({SOP: val[SOP], STUDY: val[STUDY], "prob": rng.random(len(val))})
        paths.exp_oof_dir("tiny").mkdir(parents=True, exist_ok=True)
        cnn_oof.to_parquet(paths.exp_oof_dir("tiny") / f"cnn_fold{k}.parquet", index=False)
    oof = paths.exp_oof_dir("ens_ph")
    oof.mkdir(parents=True, exist_ok=True)
    pred = noisy_predictions(truth)
    studies = sorted(truth[STUDY].unique())
    # two fold files (a sequence experiment's layout) instead of one oof.csv
    for k, part in enumerate((studies[::2], studies[1::2])):
        keep = pred["id"].isin(set(truth.loc[truth[STUDY].isin(part), SOP])) | pred["id"].str.split("_", n=1).str[0].isin(part)
        pred[keep].to_csv(oof / f"fold{k}.csv", index=False)

    out = tmp_path / "rep"
    assert load_script("10_report.py").main(["--exp", "ens_ph", "--cnn-exp", "tiny", "--out", str(out),
                                         "--n-cams", "4", "--ig", "--ig-steps", "2", "--max-pointing", "24"]) == 0
    tables = parse_report(out / "index.html")
    assert "maps.png" in tables.images
    for src in tables.images:
        assert (out / src).is_file(), src
    summary = json.loads((out / "report.json").read_text())
    pg = summary["pointing_game"]
    assert set(pg) == {"Grad-CAM", "integrated gradients"}
    n_boxed = pd.read_csv(phantom_dir / "train_boxes.csv", dtype={SOP: str})[SOP].nunique()
    for r in pg.values():
        assert 0 < r["n"] <= min(24, n_boxed)
        assert 0 < r["chance"] < 0.5 and 0 <= r["accuracy"] <= 1
    assert summary["occlusion"]["n"] == pg["Grad-CAM"]["n"]
    assert np.isfinite(summary["occlusion"]["mean_logit_drop"])
    rows = {r[0]: r for r in tables.tables["pointing-table"][1:]}
    assert _num(rows["Grad-CAM"][3]) == pytest.approx(pg["Grad-CAM"]["accuracy"], abs=6e-5)

    # The boxes land on the emboli in the model input frame (through cache resize, lung crop and
    # input resize): an embolus sits in a contrast-filled artery, so a box holds far more of the
    # slice's brightest PE-window pixels (top 10 %) than a box placed at random (10 %), and far more
    # than the same box mapped while ignoring the lung crop.
    from pe.explain.pointing import boxes_mask, boxes_to_input_frame
    from pe.report.explain_maps import explain_slices
    from pe.report.inputs import cnn_oof_folds, load_embolus_boxes, original_shapes, study_folds

    # The fold that explains a study is the one whose CNN OOF file holds it (= its validation fold).
    pd.testing.assert_series_equal(cnn_oof_folds("tiny").sort_index(), study_folds().sort_index(),
                                   check_names=False, check_dtype=False)

    boxes = load_embolus_boxes()
    assert boxes is not None
    targets = truth.loc[truth[SOP].isin(set(boxes[SOP])), [SOP, STUDY]].assign(prob=0.5)
    slices = explain_slices("tiny", targets, study_folds(), boxes, original_shapes())
    assert len(slices) == len(targets)
    shapes = original_shapes()
    bright, no_crop = [], []
    for s in slices:
        assert s.cam.shape == s.image.shape == (64, 64) and s.boxes is not None
        top = s.image > np.quantile(s.image, 0.9)
        bright.append(top[boxes_mask(s.image.shape, s.boxes)].mean())
        raw = boxes[boxes[SOP] == s.sop][["x", "y", "width", "height"]].to_numpy(float)
        rc = (int(shapes.at[s.sop, "rows"]), int(shapes.at[s.sop, "columns"]))
        wrong = boxes_to_input_frame(raw, rc, 128, None, (64, 64))
        no_crop.append(top[boxes_mask(s.image.shape, wrong)].mean() if len(wrong) else 0.0)
    assert np.mean(bright) > 0.2 and np.mean(bright) > 3 * np.mean(no_crop), (np.mean(bright), np.mean(no_crop))


def test_cnn_experiment_is_read_from_the_ensemble_members_configs() -> None:
    from pe.eval.pred_files import cnn_exp_of

    assert cnn_exp_of("ens_x") is None  # nothing on disk says
    paths.exp_oof_dir("ens_x").mkdir(parents=True, exist_ok=True)
    (paths.exp_oof_dir("ens_x") / "weights.json").write_text(json.dumps({"members": ["seq_a", "seq_b"]}))
    run = paths.run_dir("seq_b", 0)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text("name: seq_b\ncnn_exp: cnn_small\n")
    assert cnn_exp_of("ens_x") == "cnn_small"
