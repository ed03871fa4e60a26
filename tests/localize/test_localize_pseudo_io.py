"""Pseudo-mask store: run-length round trip, atomic per-study parts, index, resume."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pe.localize.pseudo_io import PseudoMaskStore, decode_rle, encode_rle


def _labels(seed=0, shape=(7, 24, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    lab[1:3, 4:9, 5:12] = 1
    lab[2, 8:14, 12:20] = 2  # touches cluster 1: ids must survive
    lab[5, rng.integers(0, shape[1], 10), rng.integers(0, shape[2], 10)] = 3
    lab[6, -1, -3:] = 4  # runs reaching the last pixel
    return lab


def test_rle_round_trip_keeps_label_values():
    sl = _labels()[2]
    s, n, v = encode_rle(sl)
    assert set(v.tolist()) == {1, 2} and (n > 0).all()
    np.testing.assert_array_equal(decode_rle(s, n, v, sl.shape), sl)
    e = encode_rle(np.zeros((4, 4), int))
    assert all(len(a) == 0 for a in e)


def test_store_round_trip_index_and_resume(tmp_path):
    store = PseudoMaskStore(tmp_path / "pseudo")
    lab = _labels()
    sops = [f"1.2.3.{i}" for i in range(lab.shape[0])]
    store.write("1.2.840.1", lab, sops, extra={"rounds": {"3": 2}})
    store.write("1.2.840.2", np.zeros((5, 8, 8), np.int32))  # empty study: shape survives
    back, back_sops = store.read("1.2.840.1")
    np.testing.assert_array_equal(back, lab)
    assert back_sops[1] == "1.2.3.1" and back_sops[0] is None  # slice 0 is empty: not stored
    empty, _ = store.read("1.2.840.2")
    assert empty.shape == (5, 8, 8) and not empty.any()
    assert store.extra("1.2.840.1") == {"rounds": {"3": 2}}
    # Compact: only non-empty slices are rows.
    part = pq.read_table(store.part_path("1.2.840.1")).to_pandas()
    assert part["slice_index"].tolist() == [1, 2, 5, 6]
    index = store.write_index()
    assert index["StudyInstanceUID"].tolist() == ["1.2.840.1", "1.2.840.2"]
    assert index.loc[0, ["n_slices", "height", "width", "n_clusters"]].tolist() == [7, 24, 32, 4]
    assert index.loc[0, "n_voxels"] == int((lab > 0).sum())
    pd.testing.assert_frame_equal(pd.read_parquet(store.root / "index.parquet"), index)
    assert store.pending(["1.2.840.3", "1.2.840.1", "1.2.840.4"]) == ["1.2.840.3", "1.2.840.4"]
    assert not list(store.parts.glob(".*tmp"))  # no temporary leftovers


def test_store_rejects_bad_input(tmp_path):
    store = PseudoMaskStore(tmp_path)
    with pytest.raises(ValueError, match="file name"):
        store.write("../evil", np.zeros((1, 2, 2), int))
    with pytest.raises(ValueError, match="integer"):
        store.write("1.2", np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="SOPInstanceUIDs"):
        store.write("1.2", np.zeros((2, 2, 2), int), ["a"])
    with pytest.raises(FileNotFoundError, match="1.9"):
        store.read("1.9")
    assert store.done() == set()


def test_export_png_feeds_the_attention_loss_mask_folder(tmp_path):
    """Pseudo-masks → <SOP>.png at the original size, read back by the attention loss's mask folder
    (pe.data.annotations.Annotations); slices without a voxel get no file; a bad SOP id never
    becomes a file name."""
    from pe.data.annotations import Annotations
    from pe.localize.pseudo_io import export_masks_png

    store = PseudoMaskStore(tmp_path / "masks")
    labels = np.zeros((3, 32, 32), np.int32)
    labels[1, 8:16, 4:12] = 2
    labels[2, 0:4, 0:4] = 1
    sops = ["aaaaaaaaaaa1", "aaaaaaaaaaa2", "../escape"]
    store.write("bbbbbbbbbbbb", labels, sops)
    counts = export_masks_png(store, tmp_path / "png", {s: (64, 48) for s in sops})
    assert counts == {"studies": 1, "written": 1, "skipped": 1}
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["aaaaaaaaaaa2.png"]
    ann = Annotations.from_path(tmp_path / "png")
    assert ann.sops == {"aaaaaaaaaaa2"}
    m = ann.original_mask("aaaaaaaaaaa2", (64, 48))
    assert m.shape == (64, 48)
    # rows 8:16 of 32 -> 16:32 of 64; columns 4:12 of 32 -> 6:18 of 48 (nearest)
    assert m[16:32, 6:18].all() and m.sum() == 16 * 12
    assert not ann.original_mask("aaaaaaaaaaa1", (64, 48)).any()
