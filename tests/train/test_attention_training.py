"""Attention supervision wired into the CNN trainer (issue 15, stage I): the dataset returns each
sample's embolus mask in its input frame, moved by the same augmentation as the image; the trainer
adds λ·L_CDC for annotated samples and logs the term; λ = 0 leaves training exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pe.config import CNNConfig, load_config
from pe.data.annotations import Annotations, sample_masks
from pe.data.cache import load_boxes, load_index
from pe.data.folds import make_folds
from pe.data.slices import SliceDataset, build_augment, build_slice_table
from pe.train.cnn import train_fold
from pe.train.losses import AttentionSliceLoss, SliceLoss, build_cnn_loss

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(phantom_dir: Path, phantom_meta: dict[str, Path], phantom_cache: Path,
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folds = tmp_path_factory.mktemp("att_folds") / "folds.csv"
    make_folds(pd.read_parquet(phantom_meta["train"]), n_folds=2, seed=0).to_csv(folds, index=False)
    return {"data": phantom_dir, "meta": phantom_meta["train"], "cache": phantom_cache, "folds": folds,
            "boxes": phantom_dir / "train_boxes.csv"}


def _cfg(s: dict[str, Path], name: str, extra: list[str]) -> CNNConfig:
    over = [f"name={name}", f"cache_dir={s['cache']}", f"meta_train={s['meta']}", f"folds_path={s['folds']}",
            "num_workers=0", "threads=1", "progress=false", "img_size=64", "epochs=2", "batch_size=16",
            "val_every=1", "preload=false", *extra]
    return load_config(CNNConfig, REPO / "src" / "configs" / "demo.yaml", over)


def _table(s: dict[str, Path]):  # noqa: ANN202
    meta = pd.read_parquet(s["meta"])
    studies = sorted(meta["StudyInstanceUID"].unique())
    return meta, build_slice_table(meta, load_index(s["cache"]), load_boxes(s["cache"]), s["cache"], studies)


def test_dataset_masks_follow_the_image_through_augmentation(setup: dict[str, Path]) -> None:
    meta, table = _table(setup)
    masks = sample_masks(table, meta, setup["boxes"])
    cfg = _cfg(setup, "m", ["aug=true", "aug_affine_p=1.0", "aug_cutout_p=0", "aug_brightness_p=0"])
    ann = Annotations.from_path(setup["boxes"])
    pos = np.flatnonzero(masks.annotated & (table.label > 0.5))
    assert len(pos) > 0
    plain = SliceDataset(table, cfg, None, masks=masks)
    aug = SliceDataset(table, cfg, build_augment(cfg), masks=masks)
    i = int(pos[0])
    code = int(table.sample_study[i])
    size = int(table.box_size[code])
    expect = ann.input_mask(str(table.sample_sop[i]), tuple(masks.shapes[i]), size, table.box(code, size), 64)
    item = plain[i]
    assert item["annotated"].item() and item["mask"].shape == (64, 64)
    assert np.array_equal(item["mask"].numpy(), expect) and expect.sum() > 0
    # the augmented mask is the un-augmented one moved by the image's own draw: paint the mask into
    # a blank image, augment both with the same seed, and the painted pixels land on the mask
    out = aug[(i, 7)]
    assert out["mask"].shape == (64, 64)
    transform = build_augment(cfg)
    transform.set_random_seed(7)
    painted = transform(image=np.repeat(expect[..., None] * 255, 9, axis=2).astype(np.uint8))["image"][..., 0]
    assert np.array_equal(painted > 127, out["mask"].numpy() > 0)
    assert not np.array_equal(out["mask"].numpy(), expect)  # the affine did move it
    # the image stream is the one a dataset without masks gives
    assert torch.equal(out["image"], SliceDataset(table, cfg, build_augment(cfg))[(i, 7)]["image"])
    # a negative slice carries a known, empty mask; an unselected positive is not annotated
    neg = int(np.flatnonzero(table.label < 0.5)[0])
    assert plain[neg]["annotated"].item() and plain[neg]["mask"].sum() == 0
    sparse = sample_masks(table, meta, setup["boxes"], studies_frac=0.0)
    assert not sparse.annotated[table.label > 0.5].any() and sparse.annotated[table.label < 0.5].all()


def test_loss_builder_and_missing_inputs(setup: dict[str, Path]) -> None:
    cfg = _cfg(setup, "l", [])
    assert isinstance(build_cnn_loss(cfg, 0.0), SliceLoss)
    cfg.attention_lambda = 0.5
    loss = build_cnn_loss(cfg, 0.0)
    assert isinstance(loss, AttentionSliceLoss) and loss.cfg.lam == 0.5
    with pytest.raises(KeyError, match="features"):
        loss({"label": torch.zeros(2), "mask": torch.zeros(2, 8, 8), "annotated": torch.ones(2, dtype=torch.bool)},
             {"logit": torch.zeros(2)})


def test_trainer_adds_and_logs_the_attention_term(setup: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("PE_OOF_DIR", str(tmp_path / "oof"))
    monkeypatch.setenv("PE_DATA_DIR", str(setup["data"]))  # default source: <data>/train_boxes.csv
    runs = {}
    for name, extra in (("plain", []), ("att", ["attention_lambda=1.0"]),
                        ("att0", ["attention_lambda=1.0", "attention_studies_frac=0", "attention_negatives=false"])):
        run = train_fold(_cfg(setup, name, extra), fold=0)
        runs[name] = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    out = capsys.readouterr().out
    assert "attention loss (lambda 1.0): masks from" in out and "(attention " in out
    assert "train_attention_loss" not in runs["plain"][0]
    att = [m["train_attention_loss"] for m in runs["att"]]
    assert all(0 < a <= 1.0 for a in att)
    assert att[1] < att[0]  # the term is optimised, not just reported
    # no annotated sample in any batch: the term is exactly 0 and training equals the plain run
    assert all(m["train_attention_loss"] == 0.0 for m in runs["att0"])
    assert [m["train_loss"] for m in runs["att0"]] == pytest.approx([m["train_loss"] for m in runs["plain"]], abs=1e-6)
    assert runs["att"][0]["train_loss"] != pytest.approx(runs["plain"][0]["train_loss"], abs=1e-6)


def test_compile_with_attention_is_refused(setup: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PE_WORK_DIR", str(tmp_path / "work"))
    with pytest.raises(ValueError, match="compile"):
        train_fold(_cfg(setup, "c", ["attention_lambda=1", "compile=true",
                                     f"attention_source={setup['boxes']}"]), fold=0)


def test_attention_layer_reads_an_earlier_finer_map(setup: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """attention_layer=backbone.layer3: the attention term sees layer3's map (twice as fine as the last
    one for test_resnet), still trains; a name the CNN lacks fails before training, naming it."""
    import pe.train.losses as losses

    monkeypatch.setenv("PE_WORK_DIR", str(tmp_path / "work"))
    seen: list[tuple[int, ...]] = []
    real = losses.attention_loss

    def spy(features: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        seen.append(tuple(features.shape[-2:]))
        return real(features, *a, **k)

    monkeypatch.setattr(losses, "attention_loss", spy)
    src = f"attention_source={setup['boxes']}"
    widths = {}
    for name, extra in (("last", []), ("l3", ["attention_layer=backbone.layer3"])):
        seen.clear()
        run = train_fold(_cfg(setup, name, ["epochs=1", "attention_lambda=1.0", src, *extra]), fold=0)
        assert seen and len(set(seen)) == 1
        widths[name] = seen[0]
        att = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["train_attention_loss"]
        assert 0 < att <= 1.0
    assert widths["l3"] == (2 * widths["last"][0], 2 * widths["last"][1])
    with pytest.raises(ValueError, match="attention_layer.*backbone.nope"):
        train_fold(_cfg(setup, "bad", ["attention_lambda=1.0", src, "attention_layer=backbone.nope"]), fold=0)
