"""The kernel runs a dual-hop experiment (condrea2023; pe.models.dual_hop) as one CNN: its best.pt holds
both hops, so export (stage 05), a sequence member on its embeddings (stage 06) and the kernel need
nothing of the hop-1 experiment; the kernel's test predictions equal the offline ones.

Kept tiny: 2 folds of an untrained ``test_resnet`` dual-hop model at 64 px (export and kernel must
compute the same thing; quality is not the point here), 2 epochs of a small BiGRU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pe import paths
from pe.rspect import STUDY

HOP, SEQ = "cnn_dual", "seq_dual"


def test_kernel_runs_a_dual_hop_experiment(phantom_dir: Path, phantom_meta: dict[str, Path], phantom_cache: Path,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pe.config import CNNConfig, SeqConfig, to_dict
    from pe.eval.hierarchy import RULE_IDS, check_long
    from pe.eval.submission import read_submission, validate
    from pe.infer import kernel
    from pe.infer.embeddings import export_embeddings
    from pe.models.dual_hop import DualHop, build_dual_hop
    from pe.models.slice_cnn import build_model
    from pe.train import seq

    root = tmp_path / "root"
    for var, sub in (("PE_DATA_DIR", None), ("PE_WORK_DIR", "work"), ("PE_OOF_DIR", "oof")):
        monkeypatch.setenv(var, str(phantom_dir if sub is None else root / sub))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for split in ("train", "test"):
            paths.meta_path(split).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(phantom_meta[split], paths.meta_path(split))
        studies = sorted(pd.read_parquet(phantom_meta["train"])[STUDY].unique())
        pd.DataFrame({STUDY: studies, "fold": [i % 2 for i in range(len(studies))]}).to_csv(paths.folds_path(),
                                                                                          index=False)
        cfg = CNNConfig(name=HOP, backbone="test_resnet", img_size=64, neighbors=1, crop_lung=True,
                        cache_dir=str(phantom_cache), cache_size=128, pretrained=False, drop_path_rate=0.0,
                        channels_last=False, amp=False, hop1_exp="hop1")
        for k in (0, 1):
            torch.manual_seed(500 + k)
            model = build_dual_hop(cfg, build_model(CNNConfig(**{**cfg.__dict__, "hop1_exp": None})).state_dict())
            with torch.no_grad():  # hop 2 different from hop 1, so the test sees if both hops run
                for p in model.aggregator.parameters():
                    p.add_(0.05 * torch.randn_like(p))
                for p in model.hop2.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            run = paths.run_dir(HOP, k)
            run.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "config": to_dict(cfg), "epoch": 0}, run / "best.pt")
        for split in ("train", "test"):
            export_embeddings(HOP, split, device="cpu", batch_size=32)
        seq_cfg = SeqConfig(name=SEQ, cnn_exp=HOP, layers=1, hidden=8, attn_dim=8, epochs=2, batch_size=4,
                            patience=2, device="cpu", num_threads=1, progress=False)
        for k in (0, 1):
            seq.train_fold(seq_cfg, k)
    finally:
        torch.set_num_threads(threads)
    models = root / "work" / "models"
    assert not (models / "hop1").exists()  # nothing of the hop-1 experiment is needed
    plan = kernel.discover_models([models], None)
    assert set(plan.cnn) == {HOP} and set(plan.seq) == {SEQ}
    icfg = kernel.InferenceConfig(data_dir=phantom_dir, models=[models], out=tmp_path / "submission.csv",
                                  weights=None, raw_out=tmp_path / "raw.csv", workers=0, progress=False,
                                  work_dir=tmp_path / "kwork", device="cpu")
    kernel.run_inference(icfg)
    from pe.models.load import load_cnn

    assert isinstance(load_cnn(paths.run_dir(HOP, 0) / "best.pt")[0], DualHop)
    folds = [pd.read_csv(root / "oof" / SEQ / f"test_fold{k}.csv", dtype={"id": str}).set_index("id")["label"]
             for k in (0, 1)]
    mean = (folds[0] + folds[1].reindex(folds[0].index)) / 2
    raw = pd.read_csv(tmp_path / "raw.csv", dtype={"id": str}).set_index("id")["label"]
    np.testing.assert_allclose(raw.reindex(mean.index).to_numpy(), mean.to_numpy(), atol=1e-4)
    test_df = pd.read_csv(phantom_dir / "test.csv", dtype=str)
    sub = read_submission(tmp_path / "submission.csv")
    validate(sub, test_df)
    assert not check_long(sub, test_df)[list(RULE_IDS)].to_numpy().any()
