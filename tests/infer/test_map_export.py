"""Reduced feature-map export (stage 05 --maps) for the ConvLSTM stage II with a real (tiny, untrained)
timm CNN on the shared phantom cache: the maps are the reduced last feature maps of the export's own
CNN pass, per study float16 next to the embeddings, resumable, and protected against a retrained
checkpoint or a changed reduction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pe import paths
from pe.rspect import STUDY

EXP = "maptest"
SPEC = dict(k=2, channels=8, seed=0, slab_every=1)


@pytest.fixture()
def cnn_runs(phantom_meta: dict[str, Path], phantom_cache: Path, untrained_cnn_runs) -> dict[int, list[str]]:
    """work/meta, a 2-fold folds.csv and best.pt of folds 0, 1 (different random weights), 64 px."""
    from pe.config import CNNConfig

    torch.set_num_threads(1)
    shutil.rmtree(paths.work_dir() / "embeddings" / EXP, ignore_errors=True)  # the roots are per session
    cfg = CNNConfig(name=EXP, backbone="test_efficientnet", img_size=64, neighbors=0, crop_lung=True,
                    cache_dir=str(phantom_cache), pretrained=False, drop_path_rate=0.0, channels_last=False)
    return untrained_cnn_runs(EXP, cfg, phantom_meta, seed=200)


def _maps(fold: int, study: str) -> np.ndarray:
    return np.load(paths.embeddings_dir(EXP, fold, "train") / "maps" / f"{study}.npy")


def test_map_export_equals_reduced_feature_maps_and_prints_the_rspect_size(
        load_script, cnn_runs: dict[int, list[str]], phantom_cache: Path, capsys: pytest.CaptureFixture) -> None:
    from pe.data.cache import load_boxes, load_study_images
    from pe.infer.embeddings import load_study_embeddings
    from pe.models.convlstm import projection_matrix, reduce_feature_maps
    from pe.models.load import load_cnn
    from pe.models.slice_cnn import preprocess_study

    script = load_script("05_export_embeddings.py")
    assert script.main(["--exp", EXP, "--split", "train", "--batch-size", "16", "--maps", "--map-size", "2",
                        "--map-channels", "8"]) == 0
    out = capsys.readouterr().out
    assert "1,790,594 slices x 8x2x2 float16" in out and "(fits 64 GB)" in out.splitlines()[1]
    d = paths.embeddings_dir(EXP, 1, "train")
    spec = json.loads((d / "maps" / "reduction.json").read_text())
    assert spec == {**SPEC, "in_features": 256}
    assert sorted(p.stem for p in (d / "maps").glob("*.npy") if p.stem != "projection") == sorted(cnn_runs[1])
    study = cnn_runs[1][0]
    emb, probs = load_study_embeddings(EXP, 1, "train", study)
    maps = _maps(1, study)
    assert maps.dtype == np.float16 and maps.shape == (len(emb), 8, 2, 2)
    # the stored maps are the reduced last feature map of the fold's CNN, lung box applied, z order
    model, cfg = load_cnn(paths.run_dir(EXP, 1) / "best.pt")
    box = load_boxes(phantom_cache).set_index(STUDY).loc[study, ["x0", "y0", "x1", "y1"]].tolist()
    x = preprocess_study(load_study_images(phantom_cache, study), cfg, box)
    proj = torch.from_numpy(projection_matrix(256, 8, 0))
    np.testing.assert_array_equal(np.load(d / "maps" / "projection.npy"), proj.numpy())
    with torch.no_grad():
        want = reduce_feature_maps(model.backbone.forward_features(x), proj, 2).numpy()
    np.testing.assert_allclose(maps.astype(np.float32), want, rtol=3e-3, atol=3e-3)


def test_map_export_resumes_and_discards_stale_maps(cnn_runs: dict[int, list[str]],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import pe.infer.embeddings
    from pe.infer.embeddings import export_fold
    from pe.models.convlstm import MapReduction

    export_fold(EXP, 0, "train", batch_size=16)  # embeddings only: no maps folder
    d = paths.embeddings_dir(EXP, 0, "train")
    assert not (d / "maps").exists()
    calls: list[int] = []
    real = pe.infer.embeddings.infer_study

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pe.infer.embeddings, "infer_study", counting)
    spec = MapReduction(**SPEC)
    export_fold(EXP, 0, "train", batch_size=16, maps=spec)  # the maps are missing: every study again
    assert len(calls) == len(cnn_runs[0])
    before = {s: _maps(0, s) for s in cnn_runs[0]}
    index = pd.read_parquet(d / "index.parquet")
    # resume: only the study whose maps are gone
    gone = cnn_runs[0][1]
    (d / "maps" / f"{gone}.npy").unlink()
    calls.clear()
    export_fold(EXP, 0, "train", batch_size=16, maps=spec)
    assert calls == [int((index[STUDY] == gone).sum())]
    np.testing.assert_array_equal(_maps(0, gone), before[gone])
    pd.testing.assert_frame_equal(pd.read_parquet(d / "index.parquet"), index)
    # another reduction: the maps folder is made again (slabs of 2: ceil(n / 2) stored slices)
    calls.clear()
    export_fold(EXP, 0, "train", batch_size=16, maps=MapReduction(k=1, channels=4, seed=0, slab_every=2))
    assert len(calls) == len(cnn_runs[0])
    s0 = cnn_runs[0][0]
    assert _maps(0, s0).shape == ((len(before[s0]) + 1) // 2, 4, 1, 1)
    # a retrained fold (other weights under the same best.pt): everything again, other maps
    export_fold(EXP, 0, "train", batch_size=16, maps=spec)
    np.testing.assert_array_equal(_maps(0, s0), before[s0])
    shutil.copy(paths.run_dir(EXP, 1) / "best.pt", paths.run_dir(EXP, 0) / "best.pt")
    export_fold(EXP, 0, "train", batch_size=16, maps=spec)
    after = _maps(0, s0)
    assert after.shape == before[s0].shape and not np.array_equal(after, before[s0])


def test_fold_model_convlstm_trains_on_its_own_cnn_maps(cnn_runs: dict[int, list[str]]) -> None:
    """train_embeddings=fold_model: fold 0's ConvLSTM reads fold 0's CNN's maps of fold 1's studies
    (train_fit), not fold 1's CNN's (another feature basis); a train_fit export with another reduction or
    with a study missing is refused."""
    from pe.config import ConvLSTMSeqConfig
    from pe.data.map_items import load_map_fold_data
    from pe.data.tables import load_train_labels
    from pe.infer.embeddings import export_fold
    from pe.models.convlstm import MapReduction

    spec = MapReduction(**SPEC)
    for k in (0, 1):
        export_fold(EXP, k, "train", batch_size=16, maps=spec)
    export_fold(EXP, 0, "train_fit", batch_size=16, maps=spec)
    labels = load_train_labels()
    oof_cfg = ConvLSTMSeqConfig(name="t", cnn_exp=EXP, progress=False)
    fit_cfg = ConvLSTMSeqConfig(name="t", cnn_exp=EXP, progress=False, train_embeddings="fold_model")
    oof_train, val, _ = load_map_fold_data(oof_cfg, 0, labels)
    fit_train, val2, _ = load_map_fold_data(fit_cfg, 0, labels)
    assert [it.study for it in val] == [it.study for it in val2] == sorted(cnn_runs[0])
    assert sorted(it.study for it in fit_train) == sorted(it.study for it in oof_train) == sorted(cnn_runs[1])
    fit_dir = paths.embeddings_dir(EXP, 0, "train_fit") / "maps"
    for it in fit_train:  # the maps of fold 0's CNN, which differ from fold 1's (other random weights)
        np.testing.assert_array_equal(it.maps, np.load(fit_dir / f"{it.study}.npy"))
        assert not np.array_equal(it.maps, _maps(1, it.study))
    export_fold(EXP, 0, "train_fit", batch_size=16, maps=MapReduction(k=1, channels=8, seed=0, slab_every=1))
    with pytest.raises(ValueError, match="reduction"):
        load_map_fold_data(fit_cfg, 0, labels)
    export_fold(EXP, 0, "train_fit", batch_size=16, maps=spec)
    (fit_dir / f"{cnn_runs[1][0]}.npy").unlink()
    idx = pd.read_parquet(fit_dir.parent / "index.parquet")
    idx[idx[STUDY] != cnn_runs[1][0]].to_parquet(fit_dir.parent / "index.parquet")
    with pytest.raises(ValueError, match="train_fit"):
        load_map_fold_data(fit_cfg, 0, labels)
    with pytest.raises(ValueError, match="train_embeddings"):
        load_map_fold_data(ConvLSTMSeqConfig(name="t", cnn_exp=EXP, progress=False, train_embeddings="both"), 0,
                           labels)
