"""Embedding export (stage 05) with a real (tiny, untrained) timm CNN on the shared phantom cache:
strictly out of fold, z order, float16, index beside the arrays, resumable per study."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pe import paths
from pe.rspect import SOP, STUDY

ROOT = Path(__file__).resolve().parents[2]
EXP = "embtest"


@pytest.fixture()
def cnn_runs(phantom_meta: dict[str, Path], phantom_cache: Path, untrained_cnn_runs) -> dict[int, list[str]]:
    """work/meta, a 2-fold folds.csv and best.pt of folds -1, 0, 1 (different random weights)."""
    from pe.config import CNNConfig

    torch.set_num_threads(1)
    cfg = CNNConfig(name=EXP, backbone="test_efficientnet", img_size=32, neighbors=0, crop_lung=True,
                    cache_dir=str(phantom_cache), pretrained=False, drop_path_rate=0.0)
    return untrained_cnn_runs(EXP, cfg, phantom_meta, folds=(-1, 0, 1), seed=100)




def test_export_is_out_of_fold_ordered_and_resumable(cnn_runs: dict[int, list[str]], phantom_cache: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import pe.infer.embeddings
    import pe.models.load
    from pe.data.cache import load_boxes, load_study_images
    from pe.infer.embeddings import export_embeddings, load_study_embeddings

    export_embeddings(EXP, "train", batch_size=16)
    meta = pd.read_parquet(paths.meta_path("train")).sort_values([STUDY, "slice_index"])
    assert not paths.embeddings_dir(EXP, -1, "train").exists()  # the full fit has no validation fold
    for k, studies in cnn_runs.items():
        d = paths.embeddings_dir(EXP, k, "train")
        assert sorted(p.stem for p in d.glob("*.npy")) == sorted(studies)  # only its own fold
        index = pd.read_parquet(d / "index.parquet")
        assert list(index.columns) == [STUDY, SOP, "slice_index", "prob"]
        expected = meta[meta[STUDY].isin(studies)]
        assert index[SOP].tolist() == expected[SOP].tolist()  # z order, every slice once
        assert index["prob"].between(0, 1).all()
        emb = np.load(d / f"{studies[0]}.npy")
        assert emb.dtype == np.float16 and emb.shape == ((expected[STUDY] == studies[0]).sum(), 256)

    # the stored arrays are the CNN's outputs for the study in z order, lung box applied
    model, cfg = pe.models.load.load_cnn(paths.run_dir(EXP, 1) / "best.pt")
    study = cnn_runs[1][0]
    box = load_boxes(phantom_cache).set_index(STUDY).loc[study, ["x0", "y0", "x1", "y1"]].tolist()
    probs, emb = pe.models.slice_cnn.infer_study(model, cfg, load_study_images(phantom_cache, study), box=box, amp=False)
    got_emb, got_probs = load_study_embeddings(EXP, 1, "train", study)
    np.testing.assert_allclose(got_emb.astype(np.float32), emb, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got_probs, probs, atol=1e-6)

    # resume: only the study whose files are gone is recomputed, the index is rebuilt identically
    d = paths.embeddings_dir(EXP, 0, "train")
    before = pd.read_parquet(d / "index.parquet")
    gone = cnn_runs[0][1]
    (d / f"{gone}.npy").unlink()
    calls: list[int] = []
    real = pe.infer.embeddings.infer_study

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pe.infer.embeddings, "infer_study", counting)
    export_embeddings(EXP, "train", folds=[0], batch_size=16)
    assert calls == [len(before[before[STUDY] == gone])]
    pd.testing.assert_frame_equal(pd.read_parquet(d / "index.parquet"), before)


def test_retrained_checkpoint_invalidates_stored_embeddings(cnn_runs: dict[int, list[str]]) -> None:
    from pe.infer.embeddings import export_fold, load_study_embeddings

    study = cnn_runs[0][0]
    export_fold(EXP, 0, "train", batch_size=16)
    before, _ = load_study_embeddings(EXP, 0, "train", study)
    export_fold(EXP, 0, "train", batch_size=16)  # same checkpoint: resumed, nothing changes
    np.testing.assert_array_equal(load_study_embeddings(EXP, 0, "train", study)[0], before)
    # "retrain" fold 0: other weights (fold 1's model) under the same best.pt
    shutil.copy(paths.run_dir(EXP, 1) / "best.pt", paths.run_dir(EXP, 0) / "best.pt")
    export_fold(EXP, 0, "train", batch_size=16)
    after, _ = load_study_embeddings(EXP, 0, "train", study)
    assert after.shape == before.shape and not np.array_equal(after, before)


def test_test_split_every_fold_and_errors(load_script, cnn_runs: dict[int, list[str]]) -> None:
    from pe.infer.embeddings import export_fold, load_study_embeddings

    script = load_script("05_export_embeddings.py")
    assert script.main(["--exp", EXP, "--split", "test", "--batch-size", "32"]) == 0
    test_meta = pd.read_parquet(paths.meta_path("test"))
    for k in (-1, 0, 1):  # the full fit predicts the test set too
        index = pd.read_parquet(paths.embeddings_dir(EXP, k, "test") / "index.parquet")
        assert set(index[SOP]) == set(test_meta[SOP]) and len(index) == len(test_meta)
    study = test_meta[STUDY].iloc[0]
    a, _ = load_study_embeddings(EXP, 0, "test", study)
    b, _ = load_study_embeddings(EXP, 1, "test", study)
    assert not np.array_equal(a, b)  # each fold's own model
    # train_fit: each fold's model on the studies it trained on (stage 2's fold_model input)
    assert script.main(["--exp", EXP, "--split", "train_fit", "--fold", "0", "--batch-size", "32"]) == 0
    fit = pd.read_parquet(paths.embeddings_dir(EXP, 0, "train_fit") / "index.parquet")
    assert set(fit[STUDY]) == set(cnn_runs[1])  # fold 0's model trained on fold 1's studies
    c, _ = load_study_embeddings(EXP, 0, "train_fit", cnn_runs[1][0])
    export_fold(EXP, 1, "train", batch_size=32)
    d, _ = load_study_embeddings(EXP, 1, "train", cnn_runs[1][0])
    assert c.shape == d.shape and not np.array_equal(c, d)  # same study, fold 0's model vs fold 1's
    with pytest.raises(ValueError, match="fold -1"):
        export_fold(EXP, -1, "train_fit")
    with pytest.raises(ValueError, match="fold -1"):
        export_fold(EXP, -1, "train")
    with pytest.raises(FileNotFoundError, match="fold7"):
        export_fold(EXP, 7, "test")
    with pytest.raises(FileNotFoundError, match="not exported"):
        load_study_embeddings(EXP, 0, "test", "0123456789ab")
