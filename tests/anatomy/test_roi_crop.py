"""Inference with the ROI crop modes (pe.anatomy.roi_crop): what the export and the kernel run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pe.anatomy.roi import crop_boxes
from pe.anatomy.roi_crop import infer_cropped, preprocess_rois, study_inputs
from pe.config import CNNConfig
from pe.data.slices import crop_resize, neighbor_indices, normalize, to_uint8_tensor
from pe.models.slice_cnn import infer_study, preprocess_study


class MeanModel(torch.nn.Module):
    """logit = mean of the input, embedding = per-channel means: enough to see which pixels came in."""

    embedding_dim = 9

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = x.mean(dim=(2, 3))
        return {"logit": emb.mean(dim=1), "embedding": emb}


def _study(n: int = 6, s: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, s, s, 3), dtype=np.uint8)
    x0 = rng.integers(0, 20, n)
    boxes = np.stack([x0, x0 + 2, x0 + 30, x0 + 36], axis=1).astype(float)
    found = np.array([False] + [True] * (n - 1))
    return images, boxes, found


def test_preprocess_rois_crops_neighbours_with_the_centre_box() -> None:
    images, boxes, found = _study()
    cfg = CNNConfig(img_size=24, neighbors=1, crop_mode="roi_slice")
    x = preprocess_rois(images, cfg, boxes)
    assert x.shape == (6, 9, 24, 24)
    for c in range(6):
        want = np.concatenate([crop_resize(images[k], boxes[c], 24) for k in neighbor_indices(c, 6, 1)], axis=-1)
        np.testing.assert_array_equal(x[c].numpy(), normalize(to_uint8_tensor(want)).numpy())
    assert preprocess_rois(images, cfg, boxes, []).shape == (0, 9, 24, 24)
    with pytest.raises(ValueError, match="5 ROI boxes for 6 slices"):
        preprocess_rois(images, cfg, boxes[:5])


@pytest.mark.parametrize("mode", ["roi_slice", "roi_slab", "roi_study"])
def test_infer_cropped_runs_the_model_on_the_roi_inputs(mode: str) -> None:
    images, boxes, found = _study()
    cfg = CNNConfig(img_size=24, neighbors=1, crop_mode=mode, crop_roi_slab=1, amp=False, channels_last=False)
    model = MeanModel()
    # rows stored at 128 px, images at 64: boxes scale by 0.5
    probs, emb = infer_cropped(model, cfg, images, rois=(boxes * 2, found, 128), batch_size=4)
    x = preprocess_rois(images, cfg, crop_boxes(boxes, found, mode.removeprefix("roi_"), 1))
    want = model(x)
    np.testing.assert_allclose(emb, want["embedding"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(probs, torch.sigmoid(want["logit"]).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="study X: crop_mode=.* needs one ROI box per slice; 6 slices, none"):
        infer_cropped(model, cfg, images, rois=None, where="study X")


def test_lung_mode_is_infer_study_unchanged() -> None:
    images, _, _ = _study()
    cfg = CNNConfig(img_size=24, neighbors=1, amp=False, channels_last=False)
    box = (4, 6, 50, 58)
    got = infer_cropped(MeanModel(), cfg, images, box=box, rois=None)
    want = infer_study(MeanModel(), cfg, images, box=box, amp=False)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["crop_lung", "crop_none", "roi_slice", "roi_study"])
def test_study_inputs_cut_as_trained_and_name_each_rows_crop(mode: str) -> None:
    """What the explanation maps feed the CNN (pe.report.explain_maps): the ROI modes' per-centre crops
    (before, the lung box was used for every CNN), and the crop each input row was cut from."""
    images, boxes, found = _study()
    lung = (4, 6, 50, 58)
    rows = [1, 4, 5]
    if mode.startswith("roi_"):
        cfg = CNNConfig(img_size=24, neighbors=1, crop_mode=mode, amp=False, channels_last=False)
        x, crops = study_inputs(images, cfg, rows, lung, (boxes * 2, found, 128))
        per_centre = crop_boxes(boxes, found, mode.removeprefix("roi_"), 5)
        assert torch.equal(x, preprocess_rois(images, cfg, per_centre, rows))
        assert crops == [tuple(int(round(v)) for v in per_centre[r]) for r in rows]
        assert len(set(crops)) == (3 if mode == "roi_slice" else 1)
        with pytest.raises(ValueError, match="study X: crop_mode=.* 6 slices, 5 rows"):
            study_inputs(images, cfg, rows, lung, (boxes[:5], found[:5], 64), where="study X")
    else:
        cfg = CNNConfig(img_size=24, neighbors=1, crop_lung=mode == "crop_lung", amp=False, channels_last=False)
        x, crops = study_inputs(images, cfg, rows, lung, None)
        want = lung if mode == "crop_lung" else None
        assert torch.equal(x, preprocess_study(images, cfg, want, rows))
        assert crops == [want] * 3
