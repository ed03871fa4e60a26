"""CNN training: it learns (held-out slice AUC), resumes exactly after a crash, and runs under
torchrun with DDP (gloo, CPU) seeing every training sample once across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pe import paths
from pe.config import CNNConfig, load_config
from pe.data.cache import load_boxes, load_index
from pe.data.folds import load_folds
from pe.data.slices import EpochBatchSampler, build_slice_table, n_channels
from pe.models.load import load_cnn
from pe.models.slice_cnn import run_batches
from pe.synthetic.caches import write_synthetic_cache
from pe.train.cnn import SimulatedCrash, train_fold
from pe.train.core import amp_settings
from pe.train.core import warmup_cosine as lr_factor

REPO = Path(__file__).resolve().parents[2]

# The demo backbone (timm test-size ResNet) on small inputs: seconds per epoch on one CPU thread.
FAST = ["drop_path_rate=0", "num_workers=0", "threads=1", "progress=false",
        "val_batch_size=64", "aug_cutout_p=0"]


def _cfg(fake: dict[str, Path], name: str, extra: list[str]) -> CNNConfig:
    over = [f"name={name}", f"cache_dir={fake['cache']}", f"meta_train={fake['meta']}",
            f"folds_path={fake['folds']}", *FAST, *extra]
    return load_config(CNNConfig, REPO / "src" / "configs" / "demo.yaml", over)


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_synthetic_cache(tmp_path_factory.mktemp("fake_train"), n_studies=12, min_slices=12, max_slices=18,
                                 size=80, seed=3, n_folds=3)


def test_lr_schedule_warmup_then_cosine() -> None:
    f = [lr_factor(s, warmup=10, total=100, min_ratio=0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[99] == pytest.approx(0.01, abs=2e-3)


def test_amp_settings_per_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_settings(cpu, True, "fp16") == (False, torch.bfloat16)  # `amp` is a CUDA option
    assert amp_settings(cpu, False, "fp16", cpu_amp=True) == (True, torch.bfloat16)  # the CPU: bf16 only
    assert amp_settings(cuda, True, "fp16") == (True, torch.float16)
    assert amp_settings(cuda, True, "bf16", cpu_amp=True) == (True, torch.bfloat16)
    assert amp_settings(cuda, False, "bf16", cpu_amp=True)[0] is False
    with pytest.raises(ValueError, match="amp_dtype"):
        amp_settings(cpu, True, "fp8")


@pytest.mark.parametrize("cpu_amp", [False, True], ids=["fp32", "cpu_bf16"])
def test_demo_model_learns_on_held_out_fold(fake: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, cpu_amp: bool) -> None:
    monkeypatch.setenv("PE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("PE_OOF_DIR", str(tmp_path / "oof"))
    cfg = _cfg(fake, "learn", ["img_size=64", "epochs=4", "val_every=1", "batch_size=16", "neg_per_epoch_frac=0.5",
                               "pos_oversample=1.5", "lr=3e-3", f"cpu_amp={str(cpu_amp).lower()}"])
    conv_dtypes: set[torch.dtype] = set()  # what the convolutions ran in: bf16 only under cpu_amp
    seen = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, _inp, out: conv_dtypes.add(out.dtype) if isinstance(mod, torch.nn.Conv2d) else None)
    try:
        run = train_fold(cfg, fold=0)
        assert conv_dtypes == ({torch.bfloat16} if cpu_amp else {torch.float32})
        # the export path (pe.models.slice_cnn.run_batches) follows the saved config the same way
        model, cfg2 = load_cnn(run / "best.pt")
        conv_dtypes.clear()
        chans = n_channels(cfg2.neighbors)
        _, emb = run_batches(model, cfg2, 3, lambda rows, dev: torch.rand(len(rows), chans, 64, 64, device=dev))
        assert conv_dtypes == ({torch.bfloat16} if cpu_amp else {torch.float32}) and emb.dtype == np.float32
        # the raw (optimiser's) weights load beside the EMA ones, and they differ (demo.yaml has ema: true)
        raw, _ = load_cnn(run / "best.pt", weights="train_model")
        assert cfg2.ema and not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                       raw.state_dict().values(), strict=True))
        with pytest.raises(ValueError, match="weights"):
            load_cnn(run / "best.pt", weights="ema")
    finally:
        seen.remove()
    assert run == paths.run_dir("learn", 0)
    assert {p.name for p in run.iterdir()} == {"config.yaml", "metrics.jsonl", "last.pt", "best.pt"}
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3]
    assert {"train_loss", "val_loss", "val_auc", "lr", "time", "samples_per_s"} <= set(metrics[0])
    # OOF: exactly the validation studies' slices, each once.
    oof = pd.read_parquet(paths.exp_oof_dir("learn") / "cnn_fold0.parquet")
    meta = pd.read_parquet(fake["meta"])
    folds = load_folds(fake["folds"])
    val_meta = meta[meta["StudyInstanceUID"].isin(folds.loc[folds["fold"] == 0, "StudyInstanceUID"])]
    assert sorted(oof["SOPInstanceUID"]) == sorted(val_meta["SOPInstanceUID"])
    y = oof.merge(val_meta, on="SOPInstanceUID")
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(y["pe_present_on_image"], y["prob"])
    assert auc >= 0.90, f"held-out slice AUC {auc:.3f} (chance 0.5)"
    assert min(m["val_loss"] for m in metrics) < metrics[0]["val_loss"] or metrics[0]["val_auc"] >= 0.9
    # best.pt loaded through the public API above, with its config.
    assert cfg2.name == "learn" and cfg2.cpu_amp is cpu_amp and model.embedding_dim > 0


def _train_until(fake: dict[str, Path], root: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str],
                 resume: bool = False) -> Path:
    monkeypatch.setenv("PE_WORK_DIR", str(root / "work"))
    monkeypatch.setenv("PE_OOF_DIR", str(root / "oof"))
    base = ["img_size=32", "epochs=2", "batch_size=8", "neg_per_epoch_frac=0.3", "ema=true", "exam_heads=true",
            "drop_rate=0.3", "save_every_steps=2", "aug=true", "aug_cutout_p=0.5"]
    return train_fold(_cfg(fake, "resume", base + extra), fold=-1, resume=resume)


def test_resume_after_crash_matches_uninterrupted_run(fake: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    run_a = _train_until(fake, tmp_path / "a", monkeypatch, [])
    with pytest.raises(SimulatedCrash):
        _train_until(fake, tmp_path / "b", monkeypatch, ["stop_after_steps=3"])
    crashed = torch.load(paths.run_dir("resume", -1) / "last.pt", weights_only=True)
    assert crashed["step"] == 2 and crashed["epoch"] == 0 and crashed["step_in_epoch"] == 2  # mid-epoch
    run_b = _train_until(fake, tmp_path / "b", monkeypatch, [], resume=True)
    a = torch.load(run_a / "last.pt", weights_only=True)
    b = torch.load(run_b / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 2 * a["steps_per_epoch"] and a["epoch"] == b["epoch"] == 2
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == a["step"]
    assert a["scheduler"]["_last_lr"] == pytest.approx(b["scheduler"]["_last_lr"])
    for key in ("model", "train_model"):  # EMA weights and raw weights
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=1e-5, atol=1e-6, msg=f"{key}.{k}")
    lines = (run_b / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [0, 1]
    # fold -1: no validation, best.pt is the last epoch.
    best = torch.load(run_b / "best.pt", weights_only=True)
    assert best["step"] == b["step"] and "val_loss" not in json.loads(lines[-1])


def test_torchrun_ddp_two_processes(fake: dict[str, Path], tmp_path: Path) -> None:
    cfg_path = tmp_path / "ddp.yaml"
    cfg = yaml.safe_load((REPO / "src" / "configs" / "demo.yaml").read_text())
    cfg.update(name="ddp", img_size=32, epochs=1, batch_size=6, neg_per_epoch_frac=1.0, pos_oversample=1.0,
               aug_cutout_p=0.0, exam_heads=False, debug_sample_log=str(tmp_path / "samples"),
               cache_dir=str(fake["cache"]), meta_train=str(fake["meta"]), folds_path=str(fake["folds"]))
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PE_WORK_DIR": str(tmp_path / "work"), "PE_OOF_DIR": str(tmp_path / "oof"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*torchrun, str(REPO / "src" / "04_train_cnn.py"), "--config", str(cfg_path), "--fold", "1",
           *[o for o in FAST if not o.startswith("threads")], "threads=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    seen = {r: (tmp_path / "samples" / f"samples_rank{r}.txt").read_text().split("\n") for r in (0, 1)}
    ids = {r: [ln.split("\t")[1] for ln in lines if ln] for r, lines in seen.items()}
    assert ids[0] and ids[1] and not set(ids[0]) & set(ids[1])
    # Expected: the epoch plan over the training folds (all slices here), every one exactly once.
    meta = pd.read_parquet(fake["meta"])
    folds = load_folds(fake["folds"])
    train_ids = folds.loc[folds["fold"] != 1, "StudyInstanceUID"]
    table = build_slice_table(meta, load_index(fake["cache"]), load_boxes(fake["cache"]), fake["cache"], train_ids)
    sampler = EpochBatchSampler(table.label, 6, seed=cfg["seed"], rank=0, world_size=2)
    sampler.set_epoch(0)
    planned = table.sample_sop[sampler.planned_samples()]
    assert sorted(ids[0] + ids[1]) == sorted(planned.tolist())
    assert len(planned) > len(table) - 4  # (nearly) the whole training set

    # Only rank 0 wrote: one metrics line, one OOF covering the validation slices once.
    run = tmp_path / "work" / "models" / "ddp" / "fold1"
    assert {p.name for p in run.iterdir()} == {"config.yaml", "metrics.jsonl", "last.pt", "best.pt"}
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    oof = pd.read_parquet(tmp_path / "oof" / "ddp" / "cnn_fold1.parquet")
    val_sops = meta.loc[meta["StudyInstanceUID"].isin(folds.loc[folds["fold"] == 1, "StudyInstanceUID"]), "SOPInstanceUID"]
    assert sorted(oof["SOPInstanceUID"]) == sorted(val_sops) and np.isfinite(oof["prob"]).all()
    assert sorted(p.name for p in (tmp_path / "oof").rglob("*") if p.is_file()) == ["cnn_fold1.parquet"]
    assert proc.stdout.count("epoch 1/1") == 1  # one summary line: rank 0 only


def test_validation_every_n_epochs_and_after_the_last(fake: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("PE_OOF_DIR", str(tmp_path / "oof"))
    cfg = _cfg(fake, "every", ["img_size=32", "epochs=3", "val_every=2", "batch_size=16", "neg_per_epoch_frac=0.3"])
    run = train_fold(cfg, fold=0)
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert ["val_loss" in m for m in metrics] == [False, True, True]  # epoch 2 (every 2nd) and the last
    assert (run / "best.pt").is_file() and (paths.exp_oof_dir("every") / "cnn_fold0.parquet").is_file()


def test_pooled_oof_auc_ranks_every_fold_together(fake: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 04's pooled figure: each fold ranks its own slices perfectly, but fold 1's model is
    shifted down, so the pooled ranking (what later stages see) is below 1; labels from the metadata."""
    from sklearn.metrics import roc_auc_score

    from pe.train.cnn import pooled_oof_auc

    monkeypatch.setenv("PE_OOF_DIR", str(tmp_path / "oof"))
    cfg = _cfg(fake, "pooled", [])
    meta = pd.read_parquet(fake["meta"])
    folds = load_folds(fake["folds"]).merge(meta[["StudyInstanceUID", "SOPInstanceUID", "pe_present_on_image"]])
    out = paths.exp_oof_dir("pooled")
    out.mkdir(parents=True)
    parts = []
    for k in (0, 1):
        part = folds[folds["fold"] == k].copy()
        # fold 0: negatives 0.5, positives 0.9; fold 1's model is shifted down (0.05 / 0.3)
        part["prob"] = np.where(part["pe_present_on_image"] == 1, 0.9, 0.5) if k == 0 else \
            np.where(part["pe_present_on_image"] == 1, 0.3, 0.05)
        part[["SOPInstanceUID", "StudyInstanceUID", "prob"]].to_parquet(out / f"cnn_fold{k}.parquet")
        assert roc_auc_score(part["pe_present_on_image"], part["prob"]) == 1.0
        parts.append(part)
    both = pd.concat(parts)
    score, n, pos = pooled_oof_auc(cfg, [0, 1])
    assert (n, pos) == (len(both), int(both["pe_present_on_image"].sum()))
    assert score == pytest.approx(roc_auc_score(both["pe_present_on_image"], both["prob"])) and score < 0.95
    with pytest.raises(FileNotFoundError, match="cnn_fold2.parquet"):
        pooled_oof_auc(cfg, [0, 2])
