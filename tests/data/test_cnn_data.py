"""2.5D data: neighbour stacking, augmentation alignment, dataset == preprocess_study, DDP sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pe.config import CNNConfig
from pe.data.cache import load_boxes, load_index, load_study_images
from pe.data.slices import (
    EpochBatchSampler,
    SliceDataset,
    build_augment,
    build_slice_table,
    epoch_plan,
    normalize,
    stack_neighbors,
)
from pe.models.slice_cnn import preprocess_study
from pe.synthetic.caches import write_synthetic_cache


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_synthetic_cache(tmp_path_factory.mktemp("fake"), n_studies=4, min_slices=5, max_slices=8, size=96)


def test_stack_neighbors_repeats_edges() -> None:
    images = np.stack([np.full((4, 4, 3), k, np.uint8) for k in range(5)])
    assert stack_neighbors(images, 0, 2)[0, 0].tolist() == [0] * 9 + [1] * 3 + [2] * 3
    assert stack_neighbors(images, 4, 1)[0, 0].tolist() == [3] * 3 + [4] * 6
    assert stack_neighbors(images, 2, 0).shape == (4, 4, 3)


def test_augmentation_keeps_stacked_slices_aligned() -> None:
    """A marker pixel at the same place in every stacked slice stays at one common place."""
    cfg = CNNConfig(neighbors=2, aug_affine_p=1.0, aug_rotate=30, aug_shift=0.2, aug_scale=0.2,
                    aug_brightness_p=1.0, aug_cutout_p=0.0)
    aug = build_augment(cfg)
    n_ch = 3 * (2 * cfg.neighbors + 1)
    img = np.zeros((64, 64, n_ch), np.uint8)
    img[20, 40, :] = np.arange(100, 100 + 10 * n_ch, 10)  # distinct value per channel
    moved = 0
    for seed in range(8):
        aug.set_random_seed(seed)
        out = aug(image=img)["image"]
        peaks = {np.unravel_index(np.argmax(out[..., c]), out.shape[:2]) for c in range(n_ch)}
        assert len(peaks) == 1, f"seed {seed}: channels disagree on the marker: {peaks}"
        moved += peaks != {(20, 40)}
    assert moved >= 6  # the transform really moves things

    cut = build_augment(CNNConfig(neighbors=1, aug_affine_p=0, aug_brightness_p=0, aug_cutout_p=1.0))
    cut.set_random_seed(3)
    holes = cut(image=np.full((64, 64, 9), 200, np.uint8))["image"] == 0
    assert holes.any() and (holes == holes[..., :1]).all()  # the same hole in every channel


def test_dataset_matches_preprocess_study(fake: dict[str, Path]) -> None:
    """Training input without augmentation == the kernel's preprocess_study of the whole study."""
    cfg = CNNConfig(img_size=48, neighbors=1, crop_lung=True)
    meta = pd.read_parquet(fake["meta"])
    index, boxes = load_index(fake["cache"]), load_boxes(fake["cache"])
    table = build_slice_table(meta, index, boxes, fake["cache"])
    ds = SliceDataset(table, cfg)
    study = table.studies[1]
    images = load_study_images(fake["cache"], study, index)
    b = boxes.set_index("StudyInstanceUID").loc[study]
    x = preprocess_study(images, cfg, (b.x0, b.y0, b.x1, b.y1))
    assert x.shape == (len(images), 9, 48, 48)
    rows = np.flatnonzero(table.sample_study == 1)
    assert len(rows) == len(images)
    for i in rows:
        item = ds[int(i)]
        assert item["image"].dtype == torch.uint8
        np.testing.assert_array_equal(normalize(item["image"]).numpy(), x[table.sample_slice[i]].numpy())
        assert item["label"].item() == meta.set_index("SOPInstanceUID").loc[table.sample_sop[i], "pe_present_on_image"]
    # The crop matters: without it the input differs.
    x_full = preprocess_study(images, CNNConfig(img_size=48, neighbors=1, crop_lung=False))
    assert not np.allclose(x_full.numpy(), x.numpy())


def test_preloaded_dataset_gives_the_same_samples_as_the_disk_path(fake: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """preload=True: identical arrays (with the same augmentation seed), no file read afterwards,
    and a clear refusal when the preload would not fit in memory."""
    import pe.data.slices as data

    cfg = CNNConfig(img_size=40, neighbors=2, crop_lung=True, aug_cutout_p=1.0)
    table = build_slice_table(pd.read_parquet(fake["meta"]), load_index(fake["cache"]), load_boxes(fake["cache"]),
                              fake["cache"])
    disk = SliceDataset(table, cfg, build_augment(cfg))
    ram = SliceDataset(table, cfg, build_augment(cfg), preload=True, workers=2)
    assert ram.slices is not None and ram.slices.shape == (len(table.files), 40, 40, 3)
    keys = [(i, 1000 + i) for i in range(len(table))] + [0, len(table) - 1]
    expected = [disk[k] for k in keys]

    def no_read(path: object) -> None:
        raise AssertionError(f"preloaded dataset read {path}")

    monkeypatch.setattr(data, "read_rgb", no_read)
    for k, want in zip(keys, expected, strict=True):
        got = ram[k]
        torch.testing.assert_close(got["image"], want["image"], rtol=0, atol=0)
        assert got["label"].item() == want["label"].item()
    monkeypatch.setattr(data, "available_memory_bytes", lambda: 1000)
    with pytest.raises(ValueError, match="preload of .* slices .* more than half"):
        SliceDataset(table, cfg, preload=True)


def test_slice_table_rejects_gaps(fake: dict[str, Path]) -> None:
    index = load_index(fake["cache"])
    broken = index.drop(index.index[2])
    with pytest.raises(ValueError, match="not 0..n-1"):
        build_slice_table(pd.read_parquet(fake["meta"]), broken, None, fake["cache"])


def test_epoch_plan_sampling() -> None:
    labels = np.array([1] * 10 + [0] * 90)
    plan = epoch_plan(labels, epoch=0, seed=1, pos_oversample=2.5, neg_frac=0.2)
    assert (labels[plan] == 1).sum() == 25 and (labels[plan] == 0).sum() == 18
    assert len(set(plan[labels[plan] == 0])) == 18  # negatives without repeats
    other = epoch_plan(labels, epoch=1, seed=1, pos_oversample=2.5, neg_frac=0.2)
    assert set(plan[labels[plan] == 0]) != set(other[labels[other] == 0])  # fresh negatives per epoch
    np.testing.assert_array_equal(plan, epoch_plan(labels, 0, 1, 2.5, 0.2))


@pytest.mark.parametrize("n", [101, 96, 37])
def test_sampler_shards_each_sample_once_with_equal_batch_counts(n: int) -> None:
    labels = (np.arange(n) % 7 == 0).astype(float)
    world, bs = 3, 8
    samplers = [EpochBatchSampler(labels, bs, seed=5, rank=r, world_size=world) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    per_rank = [[i for batch in s for i, _ in batch] for s in samplers]
    assert len({len(list(iter(s))) for s in samplers}) == 1  # same number of batches on every rank
    seen = sorted(i for r in per_rank for i in r)
    assert seen == sorted(samplers[0].planned_samples().tolist())
    assert len(seen) == len(set(seen)) and n - len(seen) < 2 * world  # at most a tiny tail dropped
    # Resume: skipping the first 2 batches yields exactly the rest, with the same augmentation seeds.
    full = list(samplers[0])
    samplers[0].set_epoch(2, start_batch=2)
    assert list(samplers[0]) == full[2:] and len(samplers[0]) == len(full) - 2


# --------------------------------------------------------------------------- ROI crop (issue 16)
def _write_rois(cache: Path, seed: int = 0) -> pd.DataFrame:
    """A rois.parquet with a different box on every slice (some not found) for the fake cache."""
    index = load_index(cache)
    rng = np.random.default_rng(seed)
    n = len(index)
    x0, y0 = rng.integers(0, 30, n), rng.integers(0, 30, n)
    rois = pd.DataFrame({"StudyInstanceUID": index["StudyInstanceUID"], "slice_index": index["slice_index"],
                         "x0": x0, "y0": y0, "x1": x0 + rng.integers(30, 60, n), "y1": y0 + rng.integers(30, 60, n),
                         "size": 96, "found": rng.random(n) > 0.2}).astype(
        {c: np.int32 for c in ("slice_index", "x0", "y0", "x1", "y1", "size")})
    rois.to_parquet(cache / "rois.parquet")
    return rois


@pytest.fixture(scope="module")
def roi_fake(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = write_synthetic_cache(tmp_path_factory.mktemp("roi_fake"), n_studies=3, min_slices=5, max_slices=7, size=96)
    _write_rois(out["cache"])
    return out


@pytest.mark.parametrize("mode", ["roi_slice", "roi_slab", "roi_study"])
def test_roi_crop_feeds_the_centre_box_to_every_neighbour(roi_fake: dict[str, Path], mode: str) -> None:
    """Training input (disk and preload) == the inference side (preprocess_rois) == the cached slices
    cropped by hand with the centre slice's stored ROI box (crop_boxes of the mode)."""
    from pe.anatomy.roi import crop_boxes
    from pe.anatomy.roi_crop import preprocess_rois
    from pe.data.cache import load_rois
    from pe.data.slices import crop_resize, neighbor_indices, study_roi_boxes

    cfg = CNNConfig(img_size=32, neighbors=1, crop_mode=mode, crop_roi_slab=1, aug=False)
    meta, index = pd.read_parquet(roi_fake["meta"]), load_index(roi_fake["cache"])
    table = build_slice_table(meta, index, load_boxes(roi_fake["cache"]), roi_fake["cache"])
    disk, ram = SliceDataset(table, cfg), SliceDataset(table, cfg, preload=True, workers=1)
    rois = load_rois(roi_fake["cache"])
    for code, study in enumerate(table.studies):
        r = rois[rois["StudyInstanceUID"] == study].sort_values("slice_index")
        raw, found = r[["x0", "y0", "x1", "y1"]].to_numpy(float), r["found"].to_numpy(bool)
        boxes = crop_boxes(raw, found, mode.removeprefix("roi_"), 1)
        images = load_study_images(roi_fake["cache"], study, index)
        x = preprocess_rois(images, cfg, study_roi_boxes(raw, found, cfg, 96, 96))
        for i in np.flatnonzero(table.sample_study == code):
            c = int(table.sample_slice[i])
            want = np.concatenate([crop_resize(images[k], boxes[c], 32)
                                   for k in neighbor_indices(c, len(images), 1)], axis=-1)
            np.testing.assert_array_equal(disk.load_stack(int(i)), want)
            np.testing.assert_array_equal(ram.load_stack(int(i)), want)
            np.testing.assert_array_equal(normalize(disk[int(i)]["image"]).numpy(), x[c].numpy())
        if mode == "roi_study":
            assert (boxes == boxes[0]).all()
    # the ROI crop is not the lung crop
    lung = SliceDataset(table, CNNConfig(img_size=32, neighbors=1, aug=False))
    assert not np.array_equal(lung.load_stack(0), disk.load_stack(0))


def test_default_crop_is_the_lung_box_and_roi_needs_its_file(fake: dict[str, Path]) -> None:
    """crop_mode defaults to lung (the study box of boxes.csv, as before issue 16: existing configs
    give the same inputs); a ROI mode on a cache without rois.parquet names the missing file."""
    from pe.data.slices import crop_resize, read_rgb

    cfg = CNNConfig(img_size=40, neighbors=0, aug=False)
    assert cfg.crop_mode == "lung" and cfg.crop_lung
    boxes = load_boxes(fake["cache"])
    table = build_slice_table(pd.read_parquet(fake["meta"]), load_index(fake["cache"]), boxes, fake["cache"])
    ds = SliceDataset(table, cfg)
    b = boxes.set_index("StudyInstanceUID").loc[table.studies[0], ["x0", "y0", "x1", "y1"]].tolist()
    img = read_rgb(fake["cache"] / table.files[0].decode())
    np.testing.assert_array_equal(ds.load_stack(int(np.flatnonzero(table.sample_slice == 0)[0])),
                                  crop_resize(img, b, 40))
    with pytest.raises(FileNotFoundError, match=r"rois\.parquet"):
        SliceDataset(table, CNNConfig(img_size=40, crop_mode="roi_slice"))
    with pytest.raises(ValueError, match="crop_mode must be one of"):
        SliceDataset(table, CNNConfig(img_size=40, crop_mode="lungs"))


def test_roi_rows_must_cover_every_cached_slice(tmp_path: Path) -> None:
    out = write_synthetic_cache(tmp_path / "c", n_studies=2, min_slices=4, max_slices=4, size=48)
    rois = _write_rois(out["cache"])
    rois.iloc[1:].to_parquet(out["cache"] / "rois.parquet")  # one slice lost
    table = build_slice_table(pd.read_parquet(out["meta"]), load_index(out["cache"]), None, out["cache"])
    with pytest.raises(ValueError, match=r"rois\.parquet: no ROI row for 1 cached slice"):
        SliceDataset(table, CNNConfig(img_size=32, crop_mode="roi_study"))
    with pytest.raises(ValueError, match="attention masks"):
        SliceDataset(table, CNNConfig(img_size=32, crop_mode="roi_study"), masks=object())
