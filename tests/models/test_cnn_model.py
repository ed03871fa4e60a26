"""Model API: outputs, Grad-CAM hook point, local pretrained weights, checkpoint loading, inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.models import adapt_input_conv

from pe.config import CNNConfig, to_dict
from pe.models.load import load_cnn
from pe.models.slice_cnn import build_model, infer_study, preprocess_study

TINY = dict(backbone="test_efficientnet", img_size=48, drop_rate=0.0, drop_path_rate=0.0)


def test_forward_outputs_and_gradcam_layer() -> None:
    torch.manual_seed(0)
    cfg = CNNConfig(**TINY, neighbors=2, exam_heads=True)
    model = build_model(cfg).eval()
    feats = {}
    model.gradcam_layer.register_forward_hook(lambda m, i, o: feats.setdefault("map", o))
    out = model(torch.randn(3, 15, 48, 48))
    assert out["logit"].shape == (3,)
    assert out["exam_logits"].shape == (3, 9)
    assert out["embedding"].shape == (3, model.embedding_dim)
    assert feats["map"].ndim == 4 and feats["map"].shape[0] == 3 and feats["map"].shape[-1] > 1
    assert "exam_logits" not in build_model(CNNConfig(**TINY, neighbors=0))(torch.randn(2, 3, 48, 48))


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_global_pool_option_pools_the_gradcam_feature_map(pool: str) -> None:
    """The embedding is the chosen pooling of the last feature map (max pooling lets one small clot
    dominate the slice, papers/shi2020… style), with the same dimension for every option."""
    torch.manual_seed(0)
    model = build_model(CNNConfig(**TINY, neighbors=1, global_pool=pool)).eval()
    feats = {}
    model.gradcam_layer.register_forward_hook(lambda m, i, o: feats.setdefault("map", o))
    emb = model(torch.randn(2, 9, 48, 48))["embedding"]
    fmap = feats["map"]
    want = {"avg": fmap.mean((2, 3)), "max": fmap.amax((2, 3)),
            "avgmax": 0.5 * (fmap.mean((2, 3)) + fmap.amax((2, 3)))}[pool]
    torch.testing.assert_close(emb, want)
    assert emb.shape == (2, model.embedding_dim)
    with pytest.raises(ValueError, match="global_pool"):
        build_model(CNNConfig(**TINY, global_pool="catavgmax"))


def test_output_stride_keeps_a_finer_last_feature_map() -> None:
    """output_stride 16 / 8 dilate the last stages: the map Grad-CAM and the pooling read is 2x / 4x
    finer (small emboli), the embedding dimension unchanged; anything else is refused."""
    side = {}
    for stride in (32, 16, 8):
        model = build_model(CNNConfig(**TINY, neighbors=0, output_stride=stride)).eval()
        maps: list[torch.Tensor] = []
        model.gradcam_layer.register_forward_hook(lambda m, i, o, maps=maps: maps.append(o))
        with torch.no_grad():
            emb = model(torch.randn(1, 3, 64, 64))["embedding"]
        side[stride] = maps[0].shape[-1]
        assert emb.shape == (1, model.embedding_dim)
    assert side == {32: 2, 16: 4, 8: 8}
    with pytest.raises(ValueError, match="output_stride"):
        build_model(CNNConfig(**TINY, output_stride=4))
    with pytest.raises(ValueError, match="'test_vit' does not take output_stride=16"):
        build_model(CNNConfig(**{**TINY, "backbone": "test_vit"}, output_stride=16))


def test_pretrained_path_adapts_first_conv(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = timm.create_model("test_efficientnet", pretrained=False, in_chans=3, num_classes=7)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    cfg = CNNConfig(**TINY, neighbors=1, pretrained_path=str(tmp_path / "w.pth"))
    bb = build_model(cfg).backbone.state_dict()
    ref = src.state_dict()
    first = "conv_stem.weight"
    assert bb[first].shape[1] == 9
    torch.testing.assert_close(bb[first], adapt_input_conv(9, ref[first]))
    other = [k for k in bb if k != first]
    assert all(torch.equal(bb[k], ref[k]) for k in other)
    # A file of another architecture is refused with the file named.
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth"):
        build_model(CNNConfig(**TINY, pretrained_path=str(tmp_path / "other.pth")))


def test_load_cnn_and_infer_study_match_the_model(tmp_path: Path) -> None:
    torch.manual_seed(2)
    cfg = CNNConfig(**TINY, neighbors=1, crop_lung=True)
    model = build_model(cfg).eval()
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "epoch": 1, "step": 3}, tmp_path / "best.pt")
    loaded, cfg2 = load_cnn(tmp_path / "best.pt")
    assert cfg2 == cfg and not loaded.training
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (7, 64, 64, 3), dtype=np.uint8)
    box = (8, 4, 56, 60)
    probs, emb = infer_study(loaded, cfg2, images, box=box, batch_size=3)
    assert probs.shape == (7,) and emb.shape == (7, loaded.embedding_dim) and emb.dtype == np.float32
    with torch.no_grad():
        out = model(preprocess_study(images, cfg, box))
    np.testing.assert_allclose(probs, torch.sigmoid(out["logit"]).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb, out["embedding"].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_study(images.astype(np.float32), cfg)


def test_sampling_prior_is_undone_in_the_logit() -> None:
    """Oversampling positives x2 and keeping 20 % of negatives multiplies the odds by 10 in
    training; the model's logit subtracts log(10) so probabilities follow the real prevalence."""
    torch.manual_seed(3)
    x = torch.randn(2, 9, 48, 48)
    plain = build_model(CNNConfig(**TINY)).eval()
    shifted = build_model(CNNConfig(**TINY, pos_oversample=2.0, neg_per_epoch_frac=0.2)).eval()
    shifted.load_state_dict({k: v for k, v in plain.state_dict().items() if k != "logit_offset"}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(shifted(x)["logit"], plain(x)["logit"] - np.log(10.0), rtol=0, atol=1e-5)
