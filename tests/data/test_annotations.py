"""Embolus annotations → masks in the model input frame, augmented like the image; sparse selection."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pe.config import CNNConfig
from pe.data.annotations import (
    Annotations,
    annotated_flags,
    augment_with_mask,
    read_boxes,
    select_annotated,
)
from pe.data.slices import build_augment, crop_resize
from pe.rspect import SOP, STUDY

ORIGINAL = (300, 400)  # rows, cols: not square, so x and y scale differently into the cache
CACHE, IMG = 128, 96
CROP = (10.3, 20.0, 110.0, 101.6)  # lung box in cache pixels (clipped/rounded as the dataset does)
BOXES = [(230.0, 140.0, 36.0, 30.0), (90.0, 60.0, 20.0, 16.0)]  # x, y, w, h in original pixels


def _image_with_markers() -> np.ndarray:
    """(IMG, IMG, 9) uint8 2.5D input whose bright squares sit exactly at the boxes, made by the
    dataset's own steps: original → cache resize → crop_resize."""
    orig = np.full((*ORIGINAL, 3), 30, np.uint8)
    for x, y, w, h in BOXES:
        orig[int(y):int(y + h), int(x):int(x + w)] = 255
    cached = cv2.resize(orig, (CACHE, CACHE), interpolation=cv2.INTER_AREA)
    one = crop_resize(cached, CROP, IMG)
    return np.concatenate([one, one, one], axis=-1)


def _annotations() -> Annotations:
    return Annotations(boxes=pd.DataFrame([("s1", *b) for b in BOXES], columns=[SOP, "x", "y", "width", "height"]))


def _bright(img: np.ndarray) -> np.ndarray:
    return img[..., 0] > 140


def _centroid(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.array([xs.mean(), ys.mean()])


def test_mask_lands_on_the_boxes_in_the_input_frame() -> None:
    mask = _annotations().input_mask("s1", ORIGINAL, CACHE, CROP, IMG)
    assert mask.shape == (IMG, IMG) and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    bright = _bright(_image_with_markers())
    iou = (bright & (mask > 0)).sum() / (bright | (mask > 0)).sum()
    assert iou > 0.75, iou
    # An unannotated slice has an all-zero mask.
    assert not _annotations().input_mask("other", ORIGINAL, CACHE, CROP, IMG).any()


@pytest.mark.parametrize("seed", range(8))
def test_boxes_follow_every_geometric_augmentation(seed: int) -> None:
    cfg = CNNConfig(aug_affine_p=1.0, aug_rotate=35.0, aug_shift=0.12, aug_scale=0.25, aug_hflip_p=0.5,
                    aug_brightness_p=0.5, aug_cutout_p=0.0)
    aug = build_augment(cfg)
    img = _image_with_markers()
    mask = _annotations().input_mask("s1", ORIGINAL, CACHE, CROP, IMG)
    # Keep one marker only, so the centroids compare one object (the other box moves the same way).
    img[: IMG // 2 + 4] = 30
    mask[: IMG // 2 + 4] = 0
    before = _centroid(mask)
    a_img, a_mask = augment_with_mask(aug, img, mask, seed=1000 + seed)
    assert a_mask.shape == mask.shape and a_mask.dtype == np.uint8 and a_mask.any()
    after = _centroid(a_mask)
    assert np.linalg.norm(after - _centroid(_bright(a_img))) < 1.5, (after, _centroid(_bright(a_img)))
    assert np.linalg.norm(after - before) > 1.0  # the sample really was moved
    # Every stacked slice moved identically (the mask matches the last slice's channels too).
    assert np.array_equal(_bright(a_img), a_img[..., 6] > 140)


def test_augment_with_mask_leaves_the_image_stream_unchanged() -> None:
    aug = build_augment(CNNConfig(aug_affine_p=1.0, aug_cutout_p=1.0, aug_brightness_p=1.0))
    img = _image_with_markers()
    mask = _annotations().input_mask("s1", ORIGINAL, CACHE, CROP, IMG)
    aug.set_random_seed(7)
    plain = aug(image=img)["image"]
    with_mask, _ = augment_with_mask(aug, img, mask, seed=7)
    assert np.array_equal(plain, with_mask)
    assert augment_with_mask(None, img, mask) == (img, mask)


def test_mask_folder_matches_boxes(tmp_path: Path) -> None:
    ann = _annotations()
    cv2.imwrite(str(tmp_path / "s1.png"), ann.original_mask("s1", ORIGINAL) * 255)
    folder = Annotations.from_path(tmp_path)
    assert folder.sops == {"s1"}
    a = ann.input_mask("s1", ORIGINAL, CACHE, CROP, IMG) > 0
    b = folder.input_mask("s1", ORIGINAL, CACHE, CROP, IMG) > 0
    bright = _bright(_image_with_markers())
    # Boxes map geometrically (partly covered pixels count), files are resampled and cut at half:
    # both cover the markers; they differ by at most a pixel ring around these small boxes.
    assert (a & b).sum() / (a | b).sum() > 0.75 and (bright & b).sum() / (bright | b).sum() > 0.75
    with pytest.raises(ValueError, match="s1.png: mask is"):
        folder.input_mask("s1", (200, 200), CACHE, None, IMG)


def test_read_boxes_validates(tmp_path: Path) -> None:
    good = tmp_path / "b.csv"
    good.write_text("SOPInstanceUID,x,y,width,height\nabc,1,2,3,4\nabc,5,6,7,8\n")
    ann = Annotations.from_path(good)
    assert ann.sops == {"abc"} and ann.original_mask("abc", (20, 20)).sum() == 12 + 56
    (tmp_path / "c.csv").write_text("SOPInstanceUID,x,y,width\nabc,1,2,3\n")
    with pytest.raises(ValueError, match=r"c.csv: missing column"):
        read_boxes(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("SOPInstanceUID,x,y,width,height\nabc,1,2,zz,4\n")
    with pytest.raises(ValueError, match=r"d.csv: 1 row"):
        read_boxes(tmp_path / "d.csv")


def _meta(n_studies: int = 20, n_slices: int = 100, spacing: float = 2.0) -> tuple[pd.DataFrame, set[str]]:
    rows, ann = [], set()
    for s in range(n_studies):
        for k in range(n_slices):
            sop = f"st{s}_sl{k}"
            rows.append({STUDY: f"st{s}", SOP: sop, "z": 100.0 - spacing * k})
            if s % 2 == 0 and 30 <= k <= 70:  # 10 positive studies, 41 positive slices each
                ann.add(sop)
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0), ann


def test_sparse_selection_respects_its_fractions() -> None:
    meta, ann = _meta()
    assert select_annotated(meta, ann, 1.0, 0.0, seed=0) == ann
    sel = select_annotated(meta, ann, studies_frac=0.3, every_mm=10.0, seed=3)
    assert sel <= ann
    studies = {s.split("_")[0] for s in sel}
    assert len(studies) == 3
    z = meta.set_index(SOP)["z"]
    for st in studies:
        zs = np.sort(z[[s for s in sel if s.startswith(st + "_")]].to_numpy())
        assert np.allclose(np.diff(zs), 10.0)  # one slice every 10 mm (5 slices of 2 mm)
        assert len(zs) in (8, 9)  # 41 positive slices / 5
    assert select_annotated(meta, ann, 0.3, 10.0, seed=3) == sel  # deterministic
    assert all(len(select_annotated(meta, ann, 0.3, 10.0, seed=s)) > 0 for s in range(3))
    assert select_annotated(meta, ann, 0.0, 10.0) == set()
    with pytest.raises(ValueError, match="studies_frac"):
        select_annotated(meta, ann, 1.5)


def test_annotated_flags() -> None:
    labels = np.array([0, 1, 1, np.nan], np.float32)
    sops = np.array(["a", "b", "c", "d"])
    assert annotated_flags(labels, sops, {"b"}).tolist() == [True, True, False, False]
    assert annotated_flags(labels, sops, {"b"}, negatives=False).tolist() == [False, True, False, False]
