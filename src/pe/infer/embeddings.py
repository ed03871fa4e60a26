"""Per-slice CNN embeddings for stage 2, strictly out of fold.

For fold k, the fold-k CNN (``work/models/<exp>/fold<k>/best.pt``, which never saw fold k) embeds
the studies of fold k (train split) and every test study (test split). Per study it writes

    work/embeddings/<exp>/fold<k>/<split>/<StudyInstanceUID>.npy      float16 (n_slices in z order, D)
    work/embeddings/<exp>/fold<k>/<split>/parts/<StudyInstanceUID>.parquet
        (StudyInstanceUID, SOPInstanceUID, slice_index, prob)

and, once every study is done, ``index.parquet`` = the concatenated parts. A study whose two files
exist is skipped, so an interrupted export resumes where it stopped.

With ``maps`` (``src/05_export_embeddings.py --maps``) the same CNN pass also stores each study's
reduced feature maps (:func:`pe.models.convlstm.reduce_feature_maps`, taken by the forward hook
:class:`pe.models.convlstm.MapCapture` that the kernel uses too) for the ConvLSTM stage II:

    work/embeddings/<exp>/fold<k>/<split>/maps/<StudyInstanceUID>.npy   float16 (m, C, k, k): the stored
        slices 0, s, 2s, ... (s = slab_every; m = n_slices when s = 1) in z order
    work/embeddings/<exp>/fold<k>/<split>/maps/reduction.json            k, channels, seed, slab_every, in_features
    work/embeddings/<exp>/fold<k>/<split>/maps/projection.npy            (in_features, C) float32

A study is then done when its maps exist too; a maps folder made with another reduction is removed
and exported again, and a retrained checkpoint removes the whole folder (checkpoint.sha256).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pe import paths
from pe.anatomy.roi import roi_mode
from pe.anatomy.roi_crop import infer_cropped, roi_lookup
from pe.config import resolve_paths
from pe.data.cache import load_boxes, load_index, load_study_images
from pe.data.folds import load_folds
from pe.io import atomic_path, write_parquet_atomic, write_text_atomic
from pe.models.convlstm import MapCapture, MapReduction, projection_matrix, slab_rows, storage_report
from pe.models.load import load_cnn
from pe.models.slice_cnn import infer_study
from pe.rspect import SOP, STUDY

INDEX_COLUMNS = [STUDY, SOP, "slice_index", "prob"]


def model_folds(exp: str) -> list[int]:
    """Folds with a trained ``best.pt`` under ``work/models/<exp>/fold<k>/`` (including -1)."""
    folds = []
    for p in (paths.models_dir() / exp).glob("fold*"):
        m = re.fullmatch(r"fold(-?\d+)", p.name)
        if m and (p / "best.pt").is_file():
            folds.append(int(m.group(1)))
    return sorted(folds)


SPLITS: tuple[str, ...] = ("train", "test", "train_fit")


def meta_split(split: str) -> str:
    """The metadata split an export split reads: ``train_fit`` embeds training studies."""
    return "train" if split == "train_fit" else split


def _split_studies(split: str, fold: int) -> list[str]:
    """Studies fold ``fold``'s model embeds: its own validation fold (train: out-of-fold), the
    studies it was trained on (train_fit: in-sample, for a stage 2 that reads one CNN's embedding
    space in training and validation, ``SeqConfig.train_embeddings = fold_model``) or all test studies."""
    if split in ("train", "train_fit"):

        folds = load_folds(paths.folds_path())
        mine = folds["fold"] == fold
        studies = folds.loc[mine if split == "train" else ~mine, STUDY].astype(str).tolist()
        if not studies:
            raise ValueError(f"{paths.folds_path()}: fold {fold} has no studies")
        return sorted(studies)
    meta_path = paths.meta_path(split)
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: {split} metadata not found (run src/01_parse_metadata.py)")
    return sorted(pd.read_parquet(meta_path, columns=[STUDY])[STUDY].astype(str).unique())


def _meta_sops(split: str) -> pd.DataFrame:
    meta_path = paths.meta_path(split)
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: {split} metadata not found (run src/01_parse_metadata.py)")
    return pd.read_parquet(meta_path, columns=[STUDY, SOP, "slice_index"])


def _box_lookup(cache_dir: Path) -> dict[str, tuple[int, int, int, int]]:

    boxes = load_boxes(cache_dir)
    return {str(r[STUDY]): (int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"]))
            for r in boxes.to_dict("records")}


def part_path(exp: str, fold: int, split: str, study: str) -> Path:
    return paths.embeddings_dir(exp, fold, split) / "parts" / f"{study}.parquet"


def checkpoint_fingerprint(ckpt: Path) -> str:
    """SHA-256 of a checkpoint's bytes: which model made a folder of embeddings."""
    h = hashlib.sha256()
    with open(ckpt, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _discard_if_stale(out_dir: Path, fingerprint: str) -> None:
    """Resume only what the same checkpoint made: a folder stamped by another best.pt (retrained
    fold) or not stamped at all is removed before export starts again."""
    stamp = out_dir / "checkpoint.sha256"
    if out_dir.exists() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        print(f"{out_dir}: made by a different checkpoint; exporting every study again", file=sys.stderr)
        shutil.rmtree(out_dir)
    if not stamp.is_file():
        write_text_atomic(stamp, fingerprint + "\n")


def maps_dir(exp: str, fold: int, split: str) -> Path:
    """Where ``--maps`` puts the reduced feature maps of a fold and split."""
    return paths.embeddings_dir(exp, fold, split) / "maps"


def _prepare_maps(out_dir: Path, spec: MapReduction) -> MapReduction:
    """Keep ``out_dir/maps`` only when it was made with the same reduction (``reduction.json``); write
    the spec and its projection (``projection.npy``) for a fresh folder. Returns the spec."""
    mdir = out_dir / "maps"
    stamp = mdir / "reduction.json"
    if mdir.exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != spec.to_json()):
        print(f"{mdir}: made with another map reduction; exporting every study's maps again", file=sys.stderr)
        shutil.rmtree(mdir)
    if not stamp.is_file() or not (mdir / "projection.npy").is_file():
        with atomic_path(mdir / "projection.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, projection_matrix(spec.in_features, spec.channels, spec.seed))
        write_text_atomic(stamp, json.dumps(spec.to_json(), sort_keys=True) + "\n")
    return spec


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def _embed_study(model: torch.nn.Module, cfg: object, images: np.ndarray, study: str, ctx: dict,
                 dev: torch.device, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(probs, embeddings float32, reduced maps of the stored slices float16 or None) of one study."""
    spec: MapReduction | None = ctx["maps"]
    reductions = {} if spec is None else {"maps": (torch.from_numpy(ctx["projection"]), spec.k)}
    with MapCapture(model, reductions) as cap:
        if ctx["use_roi"]:  # per-centre ROI crops, as SliceDataset trains them
            probs, emb = infer_cropped(model, cfg, images, rois=ctx["rois"].get(study), device=dev,
                                       batch_size=batch_size, amp=True,
                                       where=f"{ctx['cache_dir'] / 'rois.parquet'} (study {study})")
        else:
            probs, emb = infer_study(model, cfg, images, box=ctx["boxes"].get(study), device=dev,
                                     batch_size=batch_size, amp=True)
    maps = None
    if spec is not None:
        maps = cap.maps("maps")
        if len(maps) != len(images):
            raise ValueError(f"study {study}: {len(maps)} feature maps for {len(images)} slices")
        maps = maps[slab_rows(len(maps), spec.slab_every)[0]]
    return probs, np.asarray(emb, dtype=np.float32), maps


def _study_done(exp: str, fold: int, split: str, study: str, with_maps: bool) -> bool:
    out_dir = paths.embeddings_dir(exp, fold, split)
    return ((out_dir / f"{study}.npy").is_file() and part_path(exp, fold, split, study).is_file()
            and (not with_maps or (out_dir / "maps" / f"{study}.npy").is_file()))


def export_fold(exp: str, fold: int, split: str, device: str | torch.device | None = None,
                batch_size: int = 64, maps: MapReduction | None = None) -> Path:
    """Embed the studies of one fold and split (see module docstring); returns the index path. With
    ``maps`` also the reduced feature maps (``maps/<study>.npy``; the ``in_features`` of ``maps`` are
    taken from the CNN)."""

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split != "test" and fold < 0:
        raise ValueError("fold -1 (full fit) has no validation fold: it embeds the test split only")
    ckpt = paths.run_dir(exp, fold) / "best.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: CNN checkpoint not found (run src/04_train_cnn.py --fold {fold})")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = paths.embeddings_dir(exp, fold, split)
    _discard_if_stale(out_dir, checkpoint_fingerprint(ckpt))
    studies = _split_studies(split, fold)
    model, cfg = (None, None)
    if maps is not None:  # the folder's reduction is checked before anything is skipped as done
        model, cfg = load_cnn(ckpt, dev)
        maps = _prepare_maps(out_dir, replace(maps, in_features=int(model.backbone.num_features)))
    todo = [s for s in studies if not _study_done(exp, fold, split, s, maps is not None)]
    if todo:
        if model is None:
            model, cfg = load_cnn(ckpt, dev)
        cache_dir = resolve_paths(cfg)[0]
        cindex = load_index(cache_dir)
        use_roi = roi_mode(cfg) is not None
        ctx = {"maps": maps, "use_roi": use_roi, "cache_dir": cache_dir,
               "boxes": _box_lookup(cache_dir) if getattr(cfg, "crop_lung", False) and not use_roi else {},
               "rois": roi_lookup(cache_dir) if use_roi else {},
               "projection": None if maps is None else np.load(out_dir / "maps" / "projection.npy")}
        meta = _meta_sops(meta_split(split)).set_index(SOP)
        cidx = cindex[cindex[STUDY].isin(set(todo))].sort_values([STUDY, "slice_index"])
        groups = dict(tuple(cidx.groupby(STUDY, sort=False)))
        for study in tqdm(todo, desc=f"embed {exp}/fold{fold}/{split}"):
            g = groups.get(study)
            if g is None:
                raise ValueError(f"{cache_dir}/index.parquet: study {study} of the {split} split is not cached")
            sops = g[SOP].to_numpy()
            unknown = [s for s in sops if s not in meta.index]
            if unknown:
                raise ValueError(f"{cache_dir}/index.parquet: {len(unknown)} SOPInstanceUIDs of study {study} "
                                 f"are not in {paths.meta_path(meta_split(split))}, e.g. {unknown[:3]}")
            images = load_study_images(cache_dir, study, cindex)
            if len(images) != len(sops):
                raise ValueError(f"{cache_dir}: study {study} has {len(images)} images but {len(sops)} index rows")
            probs, emb, study_maps = _embed_study(model, cfg, images, study, ctx, dev, batch_size)
            if not np.isfinite(emb.astype(np.float16)).all():
                raise ValueError(f"study {study}: embeddings are not finite in float16 (|x| > 65504 or NaN)")
            if emb.shape[0] != len(sops) or np.shape(probs) != (len(sops),):
                raise ValueError(f"CNN returned embeddings {emb.shape} / probs {np.shape(probs)} "
                                 f"for {len(sops)} slices of study {study}")
            _save_npy(out_dir / f"{study}.npy", emb.astype(np.float16))
            if study_maps is not None:
                _save_npy(out_dir / "maps" / f"{study}.npy", study_maps)
            # the part is written last: its presence marks the study as complete
            write_parquet_atomic(pd.DataFrame({STUDY: study, SOP: sops,
                                               "slice_index": g["slice_index"].to_numpy(np.int64),
                                               "prob": np.asarray(probs, dtype=np.float32)}),
                                 part_path(exp, fold, split, study))
    index = pd.concat([pd.read_parquet(part_path(exp, fold, split, s)) for s in studies], ignore_index=True)
    index = index[INDEX_COLUMNS].sort_values([STUDY, "slice_index"], kind="stable").reset_index(drop=True)
    write_parquet_atomic(index, out_dir / "index.parquet")
    return out_dir / "index.parquet"


def export_embeddings(exp: str, split: str, folds: list[int] | None = None,
                      device: str | torch.device | None = None, batch_size: int = 64,
                      maps: MapReduction | None = None) -> None:
    """Export every fold of ``exp`` (all folds with a best.pt unless ``folds``; fold -1 only for test);
    with ``maps`` also the reduced feature maps, after printing their projected size for RSPECT."""
    found = model_folds(exp)
    if folds is None:
        folds = [k for k in found if split == "test" or k >= 0]
    if not folds:
        raise FileNotFoundError(f"{paths.models_dir() / exp}: no fold*/best.pt found (run src/04_train_cnn.py)")
    if maps is not None:
        print("projected size of the reduced feature maps:\n"
              + storage_report(channels=maps.channels, k=maps.k, slab_every=maps.slab_every), flush=True)
    for k in folds:
        export_fold(exp, k, split, device=device, batch_size=batch_size, maps=maps)


def load_study_embeddings(exp: str, fold: int, split: str, study: str) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n, D) float16, slice probabilities (n,) float32) of one study, z order."""
    npy = paths.embeddings_dir(exp, fold, split) / f"{study}.npy"
    part = part_path(exp, fold, split, study)
    if not npy.is_file() or not part.is_file():
        raise FileNotFoundError(f"{npy}: embeddings of study {study} not exported")
    emb = np.load(npy)
    probs = pd.read_parquet(part).sort_values("slice_index")["prob"].to_numpy(np.float32)
    if emb.shape[0] != len(probs):
        raise ValueError(f"{npy}: {emb.shape[0]} embeddings but {len(probs)} probabilities in {part}")
    return emb, probs
