"""Dual-hop model (pe.models.dual_hop): aggregator sizes, frozen hop 1, hop 2 starting as hop 1."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pe.config import CNNConfig
from pe.models.dual_hop import build_dual_hop
from pe.models.slice_cnn import build_model

BACKBONES = ["test_resnet", "test_efficientnet", "test_convnext", "test_byobnet"]


def _cfg(backbone: str) -> CNNConfig:
    return CNNConfig(backbone=backbone, neighbors=1, pretrained=False, drop_path_rate=0.0, drop_rate=0.0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_aggregate_has_input_size_and_hop2_starts_as_hop1(backbone: str) -> None:
    torch.manual_seed(0)
    hop1 = build_model(_cfg(backbone)).eval()
    model = build_dual_hop(_cfg(backbone), hop1.state_dict()).eval()
    for size in (32, 37):  # even and odd: every feature level rounds differently
        x = torch.randn(2, 9, size, size)
        with torch.no_grad():
            agg = model.aggregator(model.hop1_features(x), (size, size))
            out, ref = model(x), hop1(x)
        assert agg.shape == x.shape
        assert out["logit"].shape == (2,) and out["embedding"].shape == (2, model.embedding_dim)
        # Zero kernels on the added input channels: hop 2 begins exactly where hop 1 is.
        torch.testing.assert_close(out["logit"], ref["logit"], rtol=1e-4, atol=1e-4)


def test_output_stride_reaches_both_hops() -> None:
    """``output_stride`` builds hop 1 and hop 2 alike (one backbone factory): hop 2 still starts as
    hop 1 and its Grad-CAM map is twice as fine as at stride 32."""
    torch.manual_seed(0)
    cfg = replace(_cfg("test_resnet"), output_stride=16)
    hop1 = build_model(cfg).eval()
    model = build_dual_hop(cfg, hop1.state_dict()).eval()
    maps: list[torch.Tensor] = []
    model.gradcam_layer.register_forward_hook(lambda m, i, o: maps.append(o))
    x = torch.randn(2, 9, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logit"], hop1(x)["logit"], rtol=1e-4, atol=1e-4)
    assert maps[0].shape[-1] == 4  # 64 / 16; stride 32 gives 2


def test_hop1_frozen_while_hop2_trains() -> None:
    torch.manual_seed(0)
    model = build_dual_hop(_cfg("test_resnet"), build_model(_cfg("test_resnet")).state_dict())
    model.train()
    assert not model.hop1.training and model.hop2.training
    before = {k: v.clone() for k, v in model.hop1.state_dict().items()}  # weights and BN running stats
    hop2_before = [p.detach().clone() for p in model.hop2.parameters()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = model(torch.randn(4, 9, 32, 32))["logit"].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not p.requires_grad for p in model.hop1.parameters())
    for k, v in model.hop1.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(a, b) for a, b in zip(hop2_before, model.hop2.parameters(), strict=True))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.aggregator.parameters())


def test_wrong_hop1_weights_are_refused() -> None:
    other = build_model(_cfg("test_efficientnet")).state_dict()
    with pytest.raises(RuntimeError):
        build_dual_hop(_cfg("test_resnet"), other)


def test_stage04_trains_hop2_on_a_frozen_hop1_and_load_cnn_restores_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hop1_exp``: stage 04 builds the dual-hop model from the hop-1 experiment's best.pt of the same
    fold, trains it with hop 1 unchanged, and its best.pt is one model to export and the kernel."""
    from pe import paths
    from pe.config import load_config
    from pe.models.dual_hop import DualHop
    from pe.models.load import load_cnn
    from pe.models.slice_cnn import infer_study
    from pe.synthetic.caches import write_synthetic_cache
    from pe.train.cnn import train_fold

    monkeypatch.setenv("PE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("PE_OOF_DIR", str(tmp_path / "oof"))
    fake = write_synthetic_cache(tmp_path / "fake", n_studies=6, min_slices=8, max_slices=10, size=64, seed=1,
                                 n_folds=2)
    base = [f"cache_dir={fake['cache']}", f"meta_train={fake['meta']}", f"folds_path={fake['folds']}",
            "img_size=32", "epochs=1", "batch_size=8", "threads=1", "num_workers=0", "progress=false",
            "drop_path_rate=0", "ema=false"]
    repo = Path(__file__).resolve().parents[2]

    def cfg(*extra: str) -> CNNConfig:
        return load_config(CNNConfig, repo / "src" / "configs" / "demo.yaml", [*base, *extra])

    with pytest.raises(FileNotFoundError, match="hop1_exp"):
        train_fold(cfg("name=hop2", "hop1_exp=hop1"), fold=0)
    train_fold(cfg("name=hop1"), fold=0)
    with pytest.raises(ValueError, match="same input"):
        train_fold(cfg("name=hop2", "hop1_exp=hop1", "img_size=40"), fold=0)
    run = train_fold(cfg("name=hop2", "hop1_exp=hop1"), fold=0)
    hop1_state = torch.load(paths.run_dir("hop1", 0) / "best.pt", weights_only=True)["model"]
    model, mcfg = load_cnn(run / "best.pt")
    assert isinstance(model, DualHop) and mcfg.hop1_exp == "hop1"
    for k, v in model.hop1.state_dict().items():  # hop 1 came through training unchanged
        torch.testing.assert_close(v, hop1_state[k], rtol=0, atol=0, msg=k)
    hop2_state = torch.load(run / "best.pt", weights_only=True)["model"]
    assert any(not torch.equal(hop2_state[f"hop2.{k}"], v) for k, v in hop1_state.items()
               if f"hop2.{k}" in hop2_state and hop2_state[f"hop2.{k}"].shape == v.shape)
    images = np.random.default_rng(0).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    probs, emb = infer_study(model, mcfg, images)
    assert probs.shape == (5,) and emb.shape == (5, model.embedding_dim) and np.isfinite(probs).all()
