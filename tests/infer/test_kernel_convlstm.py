"""The kernel runs a ConvLSTM member (shi2020 stage II) on the small phantom, next to a BiGRU member:
stage 05 --maps → stage 06 (its command line) with ``model: convlstm`` → stage 07 → the kernel, whose blended test
predictions equal the offline pipeline's, with the maps taken during the kernel's own CNN pass by the
export's hook and reduction function.

The chain is kept tiny: 2 folds of an untrained ``test_efficientnet`` at 64 px (what matters here is
that export and kernel compute the same maps from the same CNN, not that the CNN is good), 2 epochs
of a small ConvLSTM and of a small BiGRU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

CNN, CONV, GRU, ENS = "cnn_m", "seq_m_conv", "seq_m_gru", "ens_m"


@pytest.fixture(scope="module")
def conv_chain(phantom_dir: Path, phantom_meta: dict[str, Path], phantom_cache: Path, load_script, chain_env,
               untrained_cnn_runs, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from pe.config import CNNConfig, ConvLSTMSeqConfig, SeqConfig, save_config
    from pe.eval import ensemble
    from pe.infer.embeddings import export_embeddings
    from pe.models.convlstm import MapReduction
    from pe.train import seq

    root = tmp_path_factory.mktemp("convchain")
    with chain_env(root, phantom_dir, phantom_meta):
        cnn_cfg = CNNConfig(name=CNN, backbone="test_efficientnet", img_size=64, neighbors=1, crop_lung=True,
                            cache_dir=str(phantom_cache), cache_size=128, pretrained=False, drop_path_rate=0.0,
                            channels_last=False, amp=False)
        untrained_cnn_runs(CNN, cnn_cfg, phantom_meta, seed=300)
        for split in ("train", "test"):
            export_embeddings(CNN, split, device="cpu", batch_size=32,
                              maps=MapReduction(k=2, channels=8, seed=0, slab_every=2))
        conv_cfg = ConvLSTMSeqConfig(name=CONV, cnn_exp=CNN, hidden=8, attn_dim=8, epochs=2, batch_size=4,
                                     patience=2, cnn_skip=True, device="cpu", num_threads=1, progress=False)
        gru_cfg = SeqConfig(name=GRU, cnn_exp=CNN, layers=1, hidden=8, attn_dim=8, epochs=2, batch_size=4,
                            patience=2, device="cpu", num_threads=1, progress=False)
        save_config(conv_cfg, root / "conv.yaml")  # the ConvLSTM through stage 06's command line
        assert load_script("06_train_sequence.py").main(["--config", str(root / "conv.yaml"), "--fold", "0,1"]) == 0
        for k in (0, 1):
            seq.train_fold(gru_cfg, k)
        stages = ensemble.run_ensemble([GRU, CONV], ENS, phantom_dir / "train.csv")
    return {"root": root, "data": phantom_dir, "models": root / "work" / "models", "stages": stages,
            "weights": root / "oof" / ENS / "weights.json", "ens_test": root / "oof" / ENS / "test.csv"}


def _aligned(a: Path, b: Path) -> tuple[np.ndarray, np.ndarray]:
    x = pd.read_csv(a, dtype={"id": str}).set_index("id")["label"]
    y = pd.read_csv(b, dtype={"id": str}).set_index("id")["label"]
    assert set(x.index) == set(y.index)
    return x.to_numpy(), y.reindex(x.index).to_numpy()


def test_convlstm_member_files_and_ensemble(conv_chain: dict) -> None:
    oof = conv_chain["root"] / "oof" / CONV
    assert {p.name for p in oof.glob("*.csv")} == {"fold0.csv", "fold1.csv", "test_fold0.csv", "test_fold1.csv"}
    rows = {r["stage"]: r for r in conv_chain["stages"]["rows"]}
    assert np.isfinite(rows[f"member {CONV}"]["oof_metric"]) and np.isfinite(rows[f"member {GRU}"]["oof_metric"])


def test_kernel_runs_the_convlstm_member_with_the_exports_reduction(conv_chain: dict, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import pe.infer.embeddings
    import pe.models.convlstm
    from pe.eval.hierarchy import RULE_IDS, check_long
    from pe.eval.submission import read_submission, validate
    from pe.infer import kernel

    assert pe.infer.embeddings.MapCapture is pe.models.convlstm.MapCapture  # one hook for export and kernel
    calls: list[tuple[int, ...]] = []
    real = pe.models.convlstm.reduce_feature_maps

    def spy(feats, projection, k):
        calls.append(tuple(feats.shape))
        return real(feats, projection, k)

    monkeypatch.setattr(pe.models.convlstm, "reduce_feature_maps", spy)
    plan = kernel.discover_models([conv_chain["models"]], conv_chain["weights"])
    assert set(plan.seq) == {CONV, GRU} and plan.seq_cnn[CONV] == CNN and plan.folds == [0, 1]
    cfg = kernel.InferenceConfig(data_dir=conv_chain["data"], models=[conv_chain["models"]],
                                 out=tmp_path / "submission.csv", weights=conv_chain["weights"],
                                 raw_out=tmp_path / "raw.csv", workers=0, progress=False,
                                 work_dir=tmp_path / "kwork", device="cpu")
    kernel.run_inference(cfg)
    assert calls  # the kernel reduced the CNN's feature maps with the export's function
    got, want = _aligned(tmp_path / "raw.csv", conv_chain["ens_test"])
    np.testing.assert_allclose(got, want, atol=1e-4)  # = the offline blend of both members
    test_df = pd.read_csv(conv_chain["data"] / "test.csv", dtype=str)
    sub = read_submission(tmp_path / "submission.csv")
    validate(sub, test_df)
    assert not check_long(sub, test_df)[list(RULE_IDS)].to_numpy().any()
    # and the ConvLSTM member alone (no weights.json: equal weights) = the mean of its test_fold files
    only = tmp_path / "only"
    for exp in (CNN, CONV):
        shutil.copytree(conv_chain["models"] / exp, only / exp)
    kernel.run_inference(kernel.InferenceConfig(**{**cfg.__dict__, "models": [only], "weights": None,
                                                   "raw_out": tmp_path / "raw_conv.csv"}))
    folds = [pd.read_csv(conv_chain["root"] / "oof" / CONV / f"test_fold{k}.csv", dtype={"id": str})
             .set_index("id")["label"] for k in (0, 1)]
    mean = (folds[0] + folds[1].reindex(folds[0].index)) / 2
    raw = pd.read_csv(tmp_path / "raw_conv.csv", dtype={"id": str}).set_index("id")["label"]
    np.testing.assert_allclose(raw.reindex(mean.index).to_numpy(), mean.to_numpy(), atol=1e-4)
