"""The offline Kaggle kernel (pe/infer/kernel.py, kernels/): parity with the offline pipeline on the
phantom, the time-budget fallback, model discovery, the Kaggle upload folders, and a test split
with every fault a user meets on real files.

One session fixture trains the whole chain on the shared small phantom, kept tiny: 2 folds, one
CNN epoch of timm's ``test_efficientnet`` at 64 px, two sequence experiments of 2 epochs each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pe import paths, rspect
from pe.eval import ensemble
from pe.eval.hierarchy import RULE_IDS, check_long
from pe.eval.submission import read_submission, validate
from pe.infer import kernel as inference

REPO = Path(__file__).resolve().parents[2]
KERNEL = REPO / "kernels" / "rsna-pe-inference" / "inference.py"
MAKE_DATASET = REPO / "kernels" / "make_kaggle_dataset.py"
CNN_EXP, SEQ_EXPS, ENS = "cnn_k", ("seq_k_gru", "seq_k_lstm"), "ens_k"
# make test runs pytest -n 2 --dist loadgroup: one worker builds the trained chain once for all tests here.
pytestmark = pytest.mark.xdist_group("kernel_chain")


@pytest.fixture(scope="session")
def chain(phantom_dir: Path, phantom_meta: dict[str, Path], phantom_cache: Path, chain_env,
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """make_phantom → parse_metadata → cache → folds → CNN → embeddings → 2 sequence models → ensemble,
    all under a temporary root (the env vars are set only while building)."""
    from pe.config import CNNConfig, SeqConfig
    from pe.data.folds import make_folds
    from pe.infer.embeddings import export_embeddings
    from pe.train.cnn import train_fold as train_cnn
    from pe.train.seq import train_fold as train_seq

    root = tmp_path_factory.mktemp("chain")
    with chain_env(root, phantom_dir, phantom_meta) as env:
        make_folds(pd.read_parquet(paths.meta_path("train")), n_folds=2, seed=0).to_csv(paths.folds_path(), index=False)
        cnn_cfg = CNNConfig(name=CNN_EXP, cache_dir=str(phantom_cache), cache_size=128, img_size=96, neighbors=1,
                            crop_lung=True, backbone="test_efficientnet", epochs=1, batch_size=16, val_batch_size=32,
                            num_workers=0, progress=False, threads=1, aug=False, amp=False, channels_last=False,
                            warmup_epochs=0.0, lr=1e-3)
        for k in (0, 1):
            train_cnn(cnn_cfg, k)
        for split in ("train", "test"):
            export_embeddings(CNN_EXP, split, device="cpu")
        for name, rnn in zip(SEQ_EXPS, ("gru", "lstm"), strict=True):
            seq_cfg = SeqConfig(name=name, cnn_exp=CNN_EXP, rnn=rnn, layers=1, hidden=16, attn_dim=8, epochs=2,
                                batch_size=4, device="cpu", num_threads=1, progress=False, patience=2)
            for k in (0, 1):
                train_seq(seq_cfg, k)
        stages = ensemble.run_ensemble(list(SEQ_EXPS), ENS, phantom_dir / "train.csv")
    return {"root": root, "data": phantom_dir, "models": root / "work" / "models",
            "weights": root / "oof" / ENS / "weights.json", "ens_test": root / "oof" / ENS / "test.csv",
            "stages": stages, "env": env}  # type: ignore[dict-item]


def _kernel_cfg(chain: dict, tmp_path: Path, **kw) -> inference.InferenceConfig:
    base = dict(data_dir=chain["data"], models=[chain["models"]], out=tmp_path / "submission.csv",
                weights=chain["weights"], raw_out=tmp_path / "raw.csv", workers=0, progress=False,
                work_dir=tmp_path / "kwork", device="cpu")
    base.update(kw)
    return inference.InferenceConfig(**base)


def _aligned(a: Path, b: Path) -> tuple[np.ndarray, np.ndarray]:
    x = pd.read_csv(a, dtype={"id": str}).set_index("id")["label"]
    y = pd.read_csv(b, dtype={"id": str}).set_index("id")["label"]
    assert set(x.index) == set(y.index)
    return x.to_numpy(), y.reindex(x.index).to_numpy()


def _assert_valid_and_consistent(sub_path: Path, data: Path) -> None:
    test_df = pd.read_csv(data / "test.csv", dtype=str)
    sub = read_submission(sub_path)
    validate(sub, test_df)
    assert not check_long(sub, test_df)[list(RULE_IDS)].to_numpy().any()


def test_stage_table_of_the_chain(chain: dict) -> None:
    from pe.eval.metric import score

    rows = {r["stage"]: r for r in chain["stages"]["rows"]}
    assert np.isfinite(rows["CNN max-aggregation"]["oof_metric"])  # found via the members' cnn_exp
    assert all(np.isfinite(rows[f"member {s}"]["oof_metric"]) for s in SEQ_EXPS)
    assert rows["ensemble + repair"]["note"].endswith("rules broken after: 0")
    # the written oof.csv is the cross-fitted blend the table reports
    oof = pd.read_csv(chain["root"] / "oof" / ENS / "oof.csv", dtype={"id": str})
    truth = pd.read_csv(chain["data"] / "train.csv", dtype={c: str for c in rspect.ID_COLUMNS})
    assert score(oof, truth) == pytest.approx(rows["ensemble cross-fitted"]["oof_metric"], rel=1e-9)


def test_kernel_from_built_dataset_matches_offline_test_predictions(chain: dict, tmp_path: Path) -> None:
    """Parity: the kernel, run as Kaggle runs it (from the code dataset that make_kaggle_dataset builds,
    in a fresh process with a decoding worker pool), reproduces the offline pipeline's blended test
    predictions (cache JPEGs → export → sequence → 07) when the JPEG round trip is on."""
    env = {**os.environ, **{k: str(v) for k, v in chain["env"].items()}, "OMP_NUM_THREADS": "1"}
    build = tmp_path / "build"
    subprocess.run([sys.executable, str(MAKE_DATASET), "--out", str(build), "--ensemble", ENS, "--user", "someone",
                    "--no-wheels"],
                   check=True, env=env, capture_output=True, text=True)
    script = build / "rsna-pe-src" / "kernels" / "rsna-pe-inference" / "inference.py"
    models = build / "rsna-pe-models"
    out, raw = tmp_path / "submission.csv", tmp_path / "raw.csv"
    env.pop("PE_SRC", None)
    proc = subprocess.run([sys.executable, str(script), "--data-dir", str(chain["data"]), "--models", str(models),
                           "--out", str(out), "--raw-out", str(raw), "--workers", "1", "--device", "cpu",
                           "--no-progress"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"pe package: {build / 'rsna-pe-src' / 'src'}" in proc.stdout
    got, want = _aligned(raw, chain["ens_test"])
    np.testing.assert_allclose(got, want, atol=1e-4)
    _assert_valid_and_consistent(out, chain["data"])


def test_kernel_without_jpeg_roundtrip_stays_within_jpeg_tolerance(chain: dict, tmp_path: Path) -> None:
    summary = inference.run_inference(_kernel_cfg(chain, tmp_path, jpeg_roundtrip=False))
    got, want = _aligned(tmp_path / "raw.csv", chain["ens_test"])
    diff = np.abs(got - want)
    # q95 4:4:4 JPEG moves pixels by a few grey levels: a visible but small change of the outputs.
    assert 0 < diff.max() < 0.05 and diff.mean() < 0.01, (diff.max(), diff.mean())
    assert summary["fallback_level"] == 0
    _assert_valid_and_consistent(tmp_path / "submission.csv", chain["data"])


@pytest.mark.parametrize("exam_head", ["voting", "voting_log_loss"])
def test_voting_exam_pe_head_offline_and_in_the_kernel(chain: dict, tmp_path: Path, exam_head: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """07 --exam-pe-head voting: negative_exam_for_pe of the OOF rows comes from cross-fitted voting heads,
    that of the test rows from the head fitted on every OOF study (stored in weights.json), the other
    labels stay the blend's; the kernel, given that weights.json, reproduces 07's test predictions.
    voting_log_loss: the same with (mu, delta) fitted for log loss, which weights.json records."""
    from pe.eval.voting import EXAM_PE_HEADS, VotingHead, probs_by_study

    for k, v in chain["env"].items():
        monkeypatch.setenv(k, str(v))
    script_07 = REPO / "src" / "07_ensemble.py"
    proc = subprocess.run([sys.executable, str(script_07), "--members", *SEQ_EXPS, "--out", f"ens_{exam_head}",
                           "--exam-pe-head", exam_head], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ensemble + voting exam PE" in proc.stdout
    assert f"fitted for {EXAM_PE_HEADS[exam_head]}" in proc.stdout
    vdir = chain["root"] / "oof" / f"ens_{exam_head}"
    spec = json.loads((vdir / "weights.json").read_text())
    head = VotingHead.from_json(spec["exam_pe_head"])
    assert spec["exam_pe_head"]["cnn_exp"] == CNN_EXP and head.criterion == EXAM_PE_HEADS[exam_head]
    plain_oof = pd.read_csv(chain["root"] / "oof" / ENS / "oof.csv", dtype={"id": str}).set_index("id")["label"]
    oof = pd.read_csv(vdir / "oof.csv", dtype={"id": str}).set_index("id")["label"].reindex(plain_oof.index)
    neg = plain_oof.index.str.endswith("_negative_exam_for_pe")
    np.testing.assert_allclose(oof[~neg], plain_oof[~neg])  # only the exam PE rows change
    assert oof[neg].nunique() <= 4  # one called / not-called value per fold's head
    test = pd.read_csv(vdir / "test.csv", dtype={"id": str}).set_index("id")["label"]
    idx = pd.concat([pd.read_parquet(chain["root"] / "work" / "embeddings" / CNN_EXP / f"fold{k}" / "test" /
                                     "index.parquet") for k in (0, 1)])
    mean = idx.groupby([rspect.STUDY, rspect.SOP], as_index=False)["prob"].mean()
    for study, p in head.p_pe(probs_by_study(mean)).items():
        assert test[f"{study}_negative_exam_for_pe"] == pytest.approx(1 - p)
    summary = inference.run_inference(_kernel_cfg(chain, tmp_path, weights=vdir / "weights.json"))
    got, want = _aligned(tmp_path / "raw.csv", vdir / "test.csv")
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert summary["fallback_level"] == 0
    _assert_valid_and_consistent(tmp_path / "submission.csv", chain["data"])
    broken = {**spec, "exam_pe_head": {**spec["exam_pe_head"], "cnn_exp": "elsewhere"}}
    (tmp_path / "w.json").write_text(json.dumps(broken))
    with pytest.raises(inference.InferenceError, match="elsewhere"):
        inference.discover_models([chain["models"]], tmp_path / "w.json")


def test_kernel_writes_the_localisation_students_clusters(chain: dict, phantom_cache: Path, tmp_path: Path) -> None:
    """--student: the kernel also writes localization.csv, the stage-12 student's clusters of every study
    computed from its own decoded slices, equal to the student run on the cache (stage 12's input)."""
    import dataclasses

    import torch

    from pe.data.cache import load_study_images
    from pe.localize.frames import pe_window
    from pe.localize.student import StudentConfig, predict_volume
    from pe.localize.student_stage import StudentStageConfig
    from pe.localize.teacher_stage import CLUSTER_COLUMNS, study_clusters
    from pe.models.seg3d import Seg3DConfig, build_seg3d

    torch.manual_seed(0)
    seg = Seg3DConfig()
    model = build_seg3d(seg).eval()
    studies = sorted(pd.read_csv(chain["data"] / "test.csv", dtype=str)[rspect.STUDY].unique())
    vols = {s: pe_window(load_study_images(phantom_cache, s)) for s in studies}
    cfg = StudentConfig(crop_zyx=(8, 64, 64))
    # an untrained student: thresholds at its own upper quantiles, so that there are clusters to compare
    prob = predict_volume(model, vols[studies[0]], cfg)
    cfg = dataclasses.replace(cfg, high=float(np.quantile(prob, 0.995)), low=float(np.quantile(prob, 0.98)))
    ckpt = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "config": {"student": dataclasses.asdict(cfg),
                                                         "seg": dataclasses.asdict(seg)}}, ckpt)
    from pe.localize.student import predict_clusters

    flt = StudentStageConfig().cluster_filter(128)
    want = pd.concat([study_clusters(s, *predict_clusters(model, v, cfg, flt),
                                     pd.read_parquet(phantom_cache / "index.parquet").query(
                                         "StudyInstanceUID == @s").sort_values("slice_index")
                                     ["SOPInstanceUID"].astype(str).tolist()) for s, v in vols.items()],
                     ignore_index=True)
    assert len(want) > 0
    summary = inference.run_inference(_kernel_cfg(chain, tmp_path, student=ckpt))
    got = pd.read_csv(tmp_path / "localization.csv", dtype={rspect.STUDY: str, "sop_first": str, "sop_last": str})
    assert list(got.columns) == CLUSTER_COLUMNS
    assert summary["localization"]["clusters"] == len(got) == len(want)
    key = [rspect.STUDY, "cluster"]
    got, want = got.sort_values(key).reset_index(drop=True), want.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got.drop(columns=["score_max", "score_mean"]),
                                  want.drop(columns=["score_max", "score_mean"]), check_dtype=False)
    np.testing.assert_allclose(got[["score_max", "score_mean"]], want[["score_max", "score_mean"]], atol=1e-4)
    _assert_valid_and_consistent(tmp_path / "submission.csv", chain["data"])
    with pytest.raises(inference.InferenceError, match="localisation student"):
        inference.run_inference(_kernel_cfg(chain, tmp_path, student=tmp_path / "nothing.pt"))


def test_tiny_budget_falls_back_to_one_fold_and_still_submits(chain: dict, tmp_path: Path) -> None:
    summary = inference.run_inference(_kernel_cfg(chain, tmp_path, budget_hours=1e-7, probe_studies=1))
    used = list(summary["folds_used_per_study"].values())
    assert used[0] == 2 and set(used[1:]) == {1} and summary["fallback_level"] == 1
    _assert_valid_and_consistent(tmp_path / "submission.csv", chain["data"])


def test_fold_levels_halve_then_one() -> None:
    assert inference.fold_levels([0, 1, 2, 3, 4]) == [[0, 1, 2, 3, 4], [0, 1, 2], [0]]
    assert inference.fold_levels([0, 1]) == [[0, 1], [0]]
    assert inference.fold_levels([-1]) == [[-1]]


def test_discover_models_pairs_folds_and_names_missing_pieces(chain: dict, tmp_path: Path) -> None:
    plan = inference.discover_models([chain["models"]], chain["weights"])
    assert plan.folds == [0, 1] and set(plan.seq) == set(SEQ_EXPS) and set(plan.cnn) == {CNN_EXP}
    only_gru = tmp_path / "m"
    shutil.copytree(chain["models"] / CNN_EXP, only_gru / CNN_EXP)
    shutil.copytree(chain["models"] / SEQ_EXPS[0], only_gru / SEQ_EXPS[0])
    with pytest.raises(inference.InferenceError, match=SEQ_EXPS[1]):
        inference.discover_models([only_gru], chain["weights"])
    plan = inference.discover_models([only_gru])  # without weights.json: the members found, equal weights
    assert list(plan.seq) == [SEQ_EXPS[0]] and plan.spec["groups"]["image"]["source"] == "equal"
    shutil.rmtree(only_gru / CNN_EXP / "fold1")
    assert inference.discover_models([only_gru]).folds == [0]
    with pytest.raises(inference.InferenceError, match="not found"):
        inference.discover_models([tmp_path / "nowhere"])


def test_make_kaggle_dataset_writes_metadata(chain: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in chain["env"].items():
        monkeypatch.setenv(k, str(v))
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_kaggle_dataset", MAKE_DATASET)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    student = tmp_path / "some_student.pt"
    student.write_bytes(b"checkpoint bytes")
    assert mod.main(["--out", str(tmp_path), "--ensemble", ENS, "--user", "alice", "--folds", "0",
                     "--no-wheels", "--student", str(student)]) == 0
    code = json.loads((tmp_path / "rsna-pe-src" / "dataset-metadata.json").read_text())
    assert code["id"] == "alice/rsna-pe-src" and code["title"] and code["licenses"]
    for rel in ("infer/kernel.py", "infer/studies.py"):
        assert (tmp_path / "rsna-pe-src" / "src" / "pe" / rel).read_text() == (REPO / "src" / "pe" / rel).read_text()
    models = tmp_path / "rsna-pe-models"
    assert json.loads((models / "dataset-metadata.json").read_text())["id"] == "alice/rsna-pe-models"
    runs = sorted(str(p.parent.relative_to(models)) for p in models.glob("*/fold*/best.pt"))
    assert runs == sorted(f"{e}/fold0" for e in (CNN_EXP, *SEQ_EXPS))
    assert all((models / r / "config.yaml").is_file() for r in runs)
    assert (models / "weights.json").read_text() == chain["weights"].read_text()
    assert (models / "student" / "model.pt").read_bytes() == b"checkpoint bytes"
    kmeta = json.loads((tmp_path / "rsna-pe-inference" / "kernel-metadata.json").read_text())
    assert kmeta["id"] == "alice/rsna-pe-inference" and kmeta["language"] == "python"
    assert kmeta["enable_gpu"] is True and kmeta["enable_internet"] is False
    assert kmeta["competition_sources"] == ["rsna-str-pulmonary-embolism-detection"]
    assert set(kmeta["dataset_sources"]) == {"alice/rsna-pe-src", "alice/rsna-pe-models", "alice/rsna-pe-wheels"}
    assert (tmp_path / "rsna-pe-src" / "kernels" / "rsna-pe-inference" / "install_wheels.py").is_file()
    assert not (tmp_path / "rsna-pe-wheels").exists()  # --no-wheels
    assert (tmp_path / "rsna-pe-inference" / kmeta["code_file"]).is_file()
    nb = json.loads((tmp_path / "rsna-pe-inference" / kmeta["code_file"]).read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    first = [next(i for i, c in enumerate(code) if name in c) for name in ("install_wheels.py", "inference.py")]
    assert first[0] < first[1]  # the offline install runs before the inference
    assert "'--student'" in code[first[1]] and "student/model.pt" in code[first[1]]
    with pytest.raises(SystemExit, match="no such student"):
        mod.main(["--out", str(tmp_path / "again"), "--ensemble", ENS, "--no-wheels", "--student",
                  str(tmp_path / "missing.pt")])


def test_load_study_matches_cache_and_replaces_broken_slices(phantom_meta: dict[str, Path], phantom_cache: Path,
                                                            tmp_path: Path) -> None:
    """The kernel's decoding equals the cache's JPEGs and lung box; an undecodable slice is logged and
    replaced by its nearest decodable neighbour, as the cache does."""
    from pe.data.cache import load_boxes, load_index, load_study_images

    meta = pd.read_parquet(phantom_meta["test"]).sort_values([rspect.STUDY, "slice_index"])
    study, g = next(iter(meta.groupby(rspect.STUDY, sort=True)))
    sops, files = g[rspect.SOP].tolist(), g["path"].tolist()
    item = inference.load_study(study, sops, files, 128, 95)
    cached = load_study_images(phantom_cache, study, load_index(phantom_cache))
    np.testing.assert_array_equal(item.images, cached)
    box = load_boxes(phantom_cache).set_index(rspect.STUDY).loc[study, ["x0", "y0", "x1", "y1"]]
    assert item.box == tuple(int(v) for v in box)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a dicom")
    files[2] = str(broken)
    item = inference.load_study(study, sops, files, 128, None)
    assert len(item.errors) == 1 and "broken.dcm" in item.errors[0]
    np.testing.assert_array_equal(item.images[2], item.images[1])  # nearest, earlier on ties
    none = inference.load_study(study, sops[:1], [str(broken)], 128, None)
    assert none.images is None and none.errors


def _faulty_split(data: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the phantom's test split with every fault: study A loses one slice's
    ImagePositionPatient; study B gets truncated pixel data, a duplicate z and a deleted file (its
    test.csv row stays); study C gets a non-DICOM file, a file named unlike its header's
    SOPInstanceUID and an extra file whose SOPInstanceUID is a path traversal."""
    import pydicom

    out = tmp_path / "faulty"
    shutil.copytree(data / "test", out / "test")
    for name in ("test.csv", "train.csv"):
        shutil.copy(data / name, out / name)
    meta = pd.read_csv(data / "test.csv", dtype=str)
    studies = sorted(meta[rspect.STUDY].unique())
    assert len(studies) >= 3

    def files(study: str) -> list[Path]:  # in z order
        fs = list((out / "test" / study).glob("*/*.dcm"))
        return sorted(fs, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))

    fa, fb, fc = files(studies[0]), files(studies[1]), files(studies[2])
    ds = pydicom.dcmread(fa[len(fa) // 2])
    ds.SliceLocation = f"{float(ds.ImagePositionPatient[2]):.3f}"  # the fallback the position-less slice gets
    del ds.ImagePositionPatient
    ds.save_as(fa[len(fa) // 2], enforce_file_format=True)
    raw = fb[2].read_bytes()
    fb[2].write_bytes(raw[: len(raw) - max(200, len(raw) // 3)])  # truncated pixel data
    ds = pydicom.dcmread(fb[5])
    ds.ImagePositionPatient = pydicom.dcmread(fb[6], stop_before_pixels=True).ImagePositionPatient  # duplicate z
    ds.save_as(fb[5], enforce_file_format=True)
    fb[-1].unlink()  # a test.csv row without a file
    (fc[0].parent / "readme.txt").write_text("not a DICOM file\n")
    fc[3].rename(fc[3].with_name("ffffffffffff.dcm"))  # header SOPInstanceUID differs from the file name
    ds = pydicom.dcmread(fc[4])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "../../../etc/passwd"
    ds.save_as(fc[0].parent / "traversal.dcm", enforce_file_format=True)
    return out, {"no_position": fa[len(fa) // 2].stem, "truncated": fb[2].stem, "no_file": fb[-1].stem,
                 "renamed": fc[3].stem, "study_a": studies[0]}


def test_kernel_survives_every_fault_and_predicts_the_slice_without_position(chain: dict, tmp_path: Path) -> None:
    data, sops = _faulty_split(chain["data"], tmp_path)
    summary = inference.run_inference(_kernel_cfg(chain, tmp_path, data_dir=data))
    test_df = pd.read_csv(data / "test.csv", dtype=str)
    sub = read_submission(tmp_path / "submission.csv")
    from pe.eval.submission import expected_ids

    assert sorted(sub["id"]) == sorted(expected_ids(test_df))  # the exact row set
    assert sub["label"].notna().all() and sub["label"].between(0, 1).all()
    assert not check_long(sub, test_df)[list(RULE_IDS)].to_numpy().any()
    for kind in ("not_dicom", "invalid_uid", "path_mismatch", "missing_file", "duplicate_z", "position_fallback"):
        assert summary["problems"].get(kind, 0) >= 1, (kind, summary["problems"])
    assert summary["decode_errors"] == 1 and summary["failed_studies"] == []
    reasons = {f[rspect.SOP]: f["reason"] for f in summary["fallback_images"]}
    assert reasons == {sops["no_position"]: "position_fallback", sops["truncated"]: "undecodable",
                       sops["no_file"]: "no_file"}
    # The position-less slice: kept, placed where its z was, predicted from its own pixels. Study A has
    # no other fault, so its predictions equal the offline pipeline's on the intact files.
    raw = pd.read_csv(tmp_path / "raw.csv", dtype={"id": str}).set_index("id")["label"]
    offline = pd.read_csv(chain["ens_test"], dtype={"id": str}).set_index("id")["label"]
    study_a = test_df.loc[test_df[rspect.STUDY] == sops["study_a"], rspect.SOP]
    np.testing.assert_allclose(raw.reindex(study_a).to_numpy(), offline.reindex(study_a).to_numpy(), atol=1e-4)
    others = raw.reindex(study_a.drop(study_a.index[study_a == sops["no_position"]]))
    assert abs(raw[sops["no_position"]] - others.mean()) > 1e-4  # not the study mean
    assert sops["renamed"] in set(sub["id"]) and raw[sops["renamed"]] == pytest.approx(offline[sops["renamed"]],
                                                                                      abs=0.05)
