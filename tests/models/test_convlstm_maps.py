"""The fixed map reduction of the ConvLSTM stage II (pooling + seeded orthogonal projection), the
forward hook that export and kernel share, slab subsampling, and the trained member's checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pe.models.convlstm import (
    ConvLSTMConfig,
    ConvLSTMMember,
    MapCapture,
    MapReduction,
    load_convlstm_member,
    predict_study_maps,
    projection_matrix,
    reduce_feature_maps,
    slab_rows,
)


def test_projection_is_orthonormal_seeded_and_identity_when_not_reducing() -> None:
    p = projection_matrix(40, 8, seed=3)
    assert p.shape == (40, 8) and p.dtype == np.float32
    np.testing.assert_allclose(p.T @ p, np.eye(8), atol=1e-5)
    np.testing.assert_array_equal(p, projection_matrix(40, 8, seed=3))
    assert not np.allclose(p, projection_matrix(40, 8, seed=4))
    np.testing.assert_array_equal(projection_matrix(6, 8, seed=0), np.eye(6, dtype=np.float32))
    assert MapReduction(channels=64, in_features=6).out_channels == 6
    with pytest.raises(ValueError):
        MapReduction(k=0)


def test_reduce_is_pooling_then_projection() -> None:
    torch.manual_seed(0)
    feats = torch.randn(3, 10, 8, 8)
    proj = torch.from_numpy(projection_matrix(10, 4, 0))
    out = reduce_feature_maps(feats, proj, 2)
    pooled = feats.view(3, 10, 2, 4, 2, 4).mean(dim=(3, 5))
    want = (pooled.permute(0, 2, 3, 1) @ proj).permute(0, 3, 1, 2)
    assert out.shape == (3, 4, 2, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="projection"):
        reduce_feature_maps(torch.randn(1, 9, 4, 4), proj, 2)


def test_slab_rows_nearest_stored_slice() -> None:
    stored, rows = slab_rows(10, 4)
    assert stored.tolist() == [0, 4, 8]
    assert rows.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]  # slice 2: tie between 0 and 4 → the earlier
    stored, rows = slab_rows(5, 1)
    assert stored.tolist() == rows.tolist() == [0, 1, 2, 3, 4]


def test_capture_hook_equals_reducing_forward_features() -> None:
    """MapCapture (what export and kernel run) gives reduce_feature_maps of the CNN's last feature map
    for every slice, batch by batch, and leaves the CNN's outputs and hooks as they were."""
    from pe.config import CNNConfig
    from pe.models.slice_cnn import build_model

    torch.manual_seed(0)
    cfg = CNNConfig(backbone="test_efficientnet", img_size=64, neighbors=0, pretrained=False, drop_path_rate=0.0)
    cnn = build_model(cfg).eval()
    x = torch.randn(5, 3, 64, 64)
    proj = torch.from_numpy(projection_matrix(cnn.backbone.num_features, 8, 0))
    with torch.no_grad():
        plain = cnn(x)["logit"]
        with MapCapture(cnn, {"a": (proj, 2), "b": (proj[:, :3], 1)}) as cap:
            hooked = torch.cat([cnn(x[:3])["logit"], cnn(x[3:])["logit"]])
        want = reduce_feature_maps(cnn.backbone.forward_features(x), proj, 2)
    torch.testing.assert_close(hooked, plain)
    maps = cap.maps("a")
    assert maps.dtype == np.float16 and maps.shape == (5, 8, 2, 2) and cap.maps("b").shape == (5, 3, 1, 1)
    np.testing.assert_allclose(maps.astype(np.float32), want.numpy(), rtol=2e-3, atol=2e-3)
    assert not cnn.gradcam_layer._forward_hooks  # removed on exit


def _member(cnn_skip: bool, slab_every: int = 1) -> ConvLSTMMember:
    torch.manual_seed(0)
    red = MapReduction(k=4, channels=3, seed=0, slab_every=slab_every, in_features=12)
    cfg = ConvLSTMConfig(in_channels=3, hidden=6, attn_dim=4, dropout=0.0, head_dropout=0.0)
    return ConvLSTMMember(cfg, red, cnn_skip=cnn_skip).eval()


def test_member_starts_at_the_cnn_with_skip_and_expands_slabs() -> None:
    model = _member(cnn_skip=True, slab_every=2)
    maps = np.random.default_rng(0).normal(size=(7, 3, 4, 4)).astype(np.float16)
    probs = np.linspace(0.05, 0.9, 7).astype(np.float32)
    image, exam = predict_study_maps(model, maps, probs)
    np.testing.assert_allclose(image, probs, atol=1e-5)  # image head zeroed, w = 1: the CNN's probabilities
    assert exam.shape == (9,) and np.all((exam > 0) & (exam < 1))
    model = _member(cnn_skip=False, slab_every=2)
    image, _ = predict_study_maps(model, maps, probs)
    _, rows = slab_rows(7, 2)
    np.testing.assert_allclose(image, image[np.searchsorted(rows, rows)])  # slices sharing a stored map agree
    assert len(np.unique(image.round(8))) == 4  # 4 stored slices of 7


def test_member_checkpoint_loads_with_weights_only(tmp_path) -> None:
    from pe.config import ConvLSTMSeqConfig, to_dict

    cfg = ConvLSTMSeqConfig(hidden=6, attn_dim=4, dropout=0.0, head_dropout=0.0, cnn_skip=True)
    model = ConvLSTMMember(ConvLSTMConfig(in_channels=3, hidden=6, attn_dim=4, dropout=0.0, head_dropout=0.0),
                           MapReduction(k=4, channels=3, in_features=12), cnn_skip=True)
    model.set_input_stats(np.full(3, 0.5), np.full(3, 2.0))
    with torch.no_grad():
        model.skip_w.fill_(0.7)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "reduction": model.reduction.to_json()},
               tmp_path / "best.pt")
    loaded, lcfg = load_convlstm_member(tmp_path / "best.pt")
    assert lcfg.cnn_skip and loaded.reduction == model.reduction
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    x = torch.randn(1, 5, 3, 4, 4)
    ones = torch.ones(1, 5, dtype=torch.bool)
    rows = torch.arange(5)[None]
    logit = torch.zeros(1, 5)
    torch.testing.assert_close(loaded(x, ones, rows, ones, logit)["exam_logits"],
                               model.eval()(x, ones, rows, ones, logit)["exam_logits"])
