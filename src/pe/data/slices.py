"""2.5D slice data for the CNN stage: neighbour stacking, lung / ROI crop, resize, augmentation,
normalisation, the training/validation dataset over the JPEG cache and the DDP-aware epoch sampler.

Input of one slice = the slice and ``neighbors`` slices on each side (study edges repeat the edge
slice), each a 3-window RGB JPEG of the cache (R lung, G PE, B mediastinal), stacked as channels in
z order: ``C = 3 * (2 * neighbors + 1)``. The deterministic part (:func:`stack_neighbors`,
:func:`crop_resize`, :func:`to_uint8_tensor`, :func:`normalize`) is shared with :func:`pe.models.slice_cnn.preprocess_study`, which the
Kaggle kernel uses on slices decoded straight from DICOM, so training and inference match exactly.
Augmentation runs on the channel-stacked uint8 array, so every stacked slice gets the same random
transform (a test checks with a marker pixel).

Crop (``cfg.crop_lung``): ``cfg.crop_mode`` ``lung`` = the study's lung box (boxes.csv), the default;
``roi_slice`` / ``roi_slab`` / ``roi_study`` = the lungs ∪ heart ROI box of the centre slice
(CACHE/rois.parquet, :func:`pe.anatomy.roi.crop_boxes`), and every neighbour of that input is cropped
with the centre's box, so the stacked slices stay registered. :func:`pe.anatomy.roi_crop.preprocess_rois`
is the inference side of the ROI modes (the export and the kernel), :func:`crop_resize` is shared by all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from pe.anatomy.roi import CROP_MODES, roi_mode, study_roi_boxes  # noqa: F401  (CROP_MODES: re-exported)
from pe.data.cache import read_jpeg
from pe.rspect import EXAM_LABELS, IMAGE_LABEL, SOP, STUDY

if TYPE_CHECKING:
    from pe.config import CNNConfig

# ImageNet statistics per RGB channel, repeated for every stacked slice: the three windows sit in
# the RGB positions pretrained backbones expect.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Smallest lung box (cached pixels) trusted for cropping; smaller boxes mean a failed lung mask.
MIN_BOX_SIDE = 16


def n_channels(neighbors: int) -> int:
    return 3 * (2 * neighbors + 1)


def neighbor_indices(center: int, n_slices: int, neighbors: int) -> np.ndarray:
    """Slice indices ``center-neighbors .. center+neighbors`` with the study's edge slice repeated."""
    return np.clip(np.arange(center - neighbors, center + neighbors + 1), 0, n_slices - 1)


def stack_neighbors(images: np.ndarray | Sequence[np.ndarray] | dict[int, np.ndarray], center: int,
                    neighbors: int, n_slices: int | None = None) -> np.ndarray:
    """(S, S, 3·(2n+1)) uint8: the centre slice and its neighbours of a z-ordered study, channels-last.

    ``images`` may be a dict slice index → image holding at least the needed slices (then give
    ``n_slices``)."""
    n = len(images) if n_slices is None else n_slices
    idx = neighbor_indices(center, n, neighbors)
    return np.concatenate([images[i] for i in idx], axis=-1)


def clip_box(box: Sequence[int] | None, height: int, width: int) -> tuple[int, int, int, int] | None:
    """The box (x0, y0, x1 exclusive, y1 exclusive) clipped to the image, or None if unusable."""
    if box is None:
        return None
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, width), min(y1, height)
    if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
        return None
    return x0, y0, x1, y1


def crop_resize(arr: np.ndarray, box: Sequence[int] | None, img_size: int) -> np.ndarray:
    """Crop (H, W, C) to the lung box when given, then resize to (img_size, img_size, C)."""
    b = clip_box(box, arr.shape[0], arr.shape[1])
    if b is not None:
        x0, y0, x1, y1 = b
        arr = arr[y0:y1, x0:x1]
    if arr.shape[0] != img_size or arr.shape[1] != img_size:
        # INTER_AREA when shrinking avoids aliasing of thin vessels; linear when enlarging.
        shrink = arr.shape[0] > img_size or arr.shape[1] > img_size
        interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        # OpenCV resizes at most 4 channels with INTER_AREA at fractional scales: one slice at a time.
        arr = np.concatenate([cv2.resize(np.ascontiguousarray(arr[..., c:c + 3]), (img_size, img_size),
                                         interpolation=interp) for c in range(0, arr.shape[-1], 3)], axis=-1)
    return np.ascontiguousarray(arr)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (…, 3k, H, W) → float32 normalised with the ImageNet mean/std of each window.

    The training loop calls this on the device (uint8 batches cost 4x less to move), preprocessing
    on the CPU; both run this same function."""
    k = x.shape[-3] // 3
    mean = torch.tensor(np.tile(IMAGENET_MEAN * 255.0, k), device=x.device).view(-1, 1, 1)
    std = torch.tensor(np.tile(IMAGENET_STD * 255.0, k), device=x.device).view(-1, 1, 1)
    return x.to(torch.float32, copy=True).sub_(mean).div_(std)  # in place on the copy: no temporaries


def to_uint8_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3k) → uint8 tensor (3k, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def build_augment(cfg: CNNConfig) -> A.Compose | None:
    """Random augmentation of the channel-stacked uint8 array (None when cfg.aug is false).

    Horizontal flips are off by default: they swap left and right lungs, which the exam labels
    leftsided_pe / rightsided_pe distinguish. Cutout follows papers/condrea2023… (2 large holes).
    """
    if not cfg.aug:
        return None
    t: list[A.BasicTransform] = []
    if cfg.aug_hflip_p > 0:
        t.append(A.HorizontalFlip(p=cfg.aug_hflip_p))
    if cfg.aug_affine_p > 0:
        t.append(A.Affine(scale=(1 - cfg.aug_scale, 1 + cfg.aug_scale),
                          translate_percent=(-cfg.aug_shift, cfg.aug_shift),
                          rotate=(-cfg.aug_rotate, cfg.aug_rotate), border_mode=cv2.BORDER_CONSTANT,
                          fill=0, p=cfg.aug_affine_p))
    if cfg.aug_brightness_p > 0:
        t.append(A.RandomBrightnessContrast(brightness_limit=cfg.aug_brightness,
                                            contrast_limit=cfg.aug_contrast, p=cfg.aug_brightness_p))
    if cfg.aug_cutout_p > 0:
        t.append(A.CoarseDropout(num_holes_range=(1, cfg.aug_cutout_holes),
                                 hole_height_range=(0.05, cfg.aug_cutout_size),
                                 hole_width_range=(0.05, cfg.aug_cutout_size), fill=0, p=cfg.aug_cutout_p))
    return A.Compose(t) if t else None


def read_rgb(path: str | Path) -> np.ndarray:
    """One cached slice as uint8 RGB (S, S, 3) (pe.data.cache.read_jpeg: the cache's own reader)."""

    return read_jpeg(path)


@dataclass
class SliceTable:
    """Every slice of a set of studies, as flat numpy arrays (no per-row Python objects, so worker
    processes share it copy-on-write even at 1.8 M slices).

    ``files[study_start[s] + k]`` is slice k (z order) of study code s; samples are rows.
    """

    cache_dir: Path
    studies: np.ndarray  # (n_studies,) str: StudyInstanceUID per study code
    study_start: np.ndarray  # (n_studies,) int64 offset into files
    study_len: np.ndarray  # (n_studies,) int32 slices per study
    files: np.ndarray  # (n_files,) bytes: path relative to cache_dir
    boxes: np.ndarray  # (n_studies, 4) float32 lung box in cached pixels, NaN when absent
    box_size: np.ndarray  # (n_studies,) float32 image size the box refers to
    sample_study: np.ndarray  # (n,) int32 study code of each sample
    sample_slice: np.ndarray  # (n,) int32 slice index of each sample
    sample_sop: np.ndarray  # (n,) str SOPInstanceUID
    label: np.ndarray  # (n,) float32 pe_present_on_image (NaN if unlabelled)
    exam: np.ndarray  # (n, 9) float32 exam labels of the sample's study (NaN if unlabelled)
    # per cached file, read from cache_dir/rois.parquet on first use (ROI crop modes only)
    roi_rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (boxes (n_files, 4), found, size)
    roi_crops: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (mode, slab) -> centre boxes

    def __len__(self) -> int:
        return len(self.sample_study)

    def study_files(self, code: int) -> list[Path]:
        s, n = int(self.study_start[code]), int(self.study_len[code])
        return [self.cache_dir / f.decode() for f in self.files[s:s + n]]

    def box(self, code: int, image_size: int) -> tuple[float, float, float, float] | None:
        b = self.boxes[code]
        if np.isnan(b).any():
            return None
        scale = image_size / float(self.box_size[code]) if self.box_size[code] > 0 else 1.0
        return tuple(float(v) * scale for v in b)  # type: ignore[return-value]

    def load_rois(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes (n_files, 4) float32, found bool, size float32) of every cached file, from
        ``cache_dir/rois.parquet``; every file must have its row."""
        if self.roi_rows is None:
            from pe.anatomy.roi_cache import rois_per_file

            self.roi_rows = rois_per_file(self.cache_dir, self.studies, self.study_len)
        return self.roi_rows

    def roi_box(self, code: int, center: int, image_size: int, cfg: CNNConfig) -> tuple[float, ...]:
        """The ROI crop box of slice ``center`` of study ``code`` (and of its neighbours) in the pixels of
        ``image_size`` images, for ``cfg``'s ROI mode (:func:`study_roi_boxes`, computed once per mode)."""
        key = (str(cfg.crop_mode), int(cfg.crop_roi_slab))
        if key not in self.roi_crops:
            boxes, found, size = self.load_rois()
            out = np.empty_like(boxes)
            for c in range(len(self.studies)):
                s, n = int(self.study_start[c]), int(self.study_len[c])
                out[s:s + n] = study_roi_boxes(boxes[s:s + n], found[s:s + n], cfg, 1, 1) / size[s:s + n, None]
            self.roi_crops[key] = out  # in units of the image side
        b = self.roi_crops[key][int(self.study_start[code]) + center]
        return tuple(float(v) * image_size for v in b)

    def frame(self) -> pd.DataFrame:
        """One row per sample: StudyInstanceUID, SOPInstanceUID, slice_index, label."""
        return pd.DataFrame({STUDY: self.studies[self.sample_study], SOP: self.sample_sop,
                             "slice_index": self.sample_slice, IMAGE_LABEL: self.label})


def build_slice_table(meta: pd.DataFrame, index: pd.DataFrame, boxes: pd.DataFrame | None,
                      cache_dir: str | Path, studies: Sequence[str] | None = None,
                      drop_replaced: bool = True) -> SliceTable:
    """Join metadata (labels) with the cache index (files) for ``studies`` (all when None).

    Every study's cached slices must be 0..n-1 without gaps (the neighbour lookup relies on it);
    cache slices marked ``replaced`` (undecodable originals) stay available as neighbours but are
    not training samples when ``drop_replaced``.
    """
    cache_dir = Path(cache_dir)
    for c in (STUDY, SOP, "slice_index", "file"):
        if c not in index.columns:
            raise ValueError(f"{cache_dir}/index.parquet: missing column {c!r}")
    if studies is not None:
        keep = set(studies)
        index = index[index[STUDY].isin(keep)]
        meta = meta[meta[STUDY].isin(keep)]
        missing = keep - set(index[STUDY])
        if missing:
            raise ValueError(f"{cache_dir}: {len(missing)} study(ies) not in the cache index, "
                             f"e.g. {sorted(missing)[:3]}")
    index = index.sort_values([STUDY, "slice_index"], kind="stable").reset_index(drop=True)
    codes, uniques = pd.factorize(index[STUDY], sort=True)
    n_per = np.bincount(codes, minlength=len(uniques)).astype(np.int32)
    start = np.concatenate([[0], np.cumsum(n_per)[:-1]]).astype(np.int64)
    expected = np.arange(len(index)) - start[codes]
    if not np.array_equal(index["slice_index"].to_numpy(), expected):
        bad = uniques[codes[index["slice_index"].to_numpy() != expected][0]]
        raise ValueError(f"{cache_dir}/index.parquet: slice_index of study {bad} is not 0..n-1")

    box_arr = np.full((len(uniques), 4), np.nan, dtype=np.float32)
    box_size = np.zeros(len(uniques), dtype=np.float32)
    if boxes is not None and len(boxes):
        b = boxes.drop_duplicates(STUDY).set_index(STUDY).reindex(uniques)
        box_arr = b[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.float32)
        box_size = b["size"].fillna(0).to_numpy(dtype=np.float32) if "size" in b else box_size

    samples = index if not drop_replaced or "replaced" not in index else index[~index["replaced"].astype(bool)]
    cols = [c for c in [SOP, IMAGE_LABEL, *EXAM_LABELS] if c in meta.columns]
    dup = meta[SOP].duplicated()
    if dup.any():
        raise ValueError(f"metadata: SOPInstanceUID {meta[SOP][dup].iloc[0]} appears more than once")
    samples = samples.merge(meta[cols], on=SOP, how="left", validate="one_to_one")
    sample_codes = pd.Index(uniques).get_indexer(samples[STUDY])
    label = samples[IMAGE_LABEL].to_numpy(np.float32) if IMAGE_LABEL in samples else np.full(len(samples), np.nan,
                                                                                               np.float32)
    exam = np.full((len(samples), len(EXAM_LABELS)), np.nan, dtype=np.float32)
    for j, c in enumerate(EXAM_LABELS):
        if c in samples:
            exam[:, j] = samples[c].to_numpy(np.float32)
    return SliceTable(
        cache_dir=cache_dir, studies=np.asarray(uniques, dtype=str), study_start=start, study_len=n_per,
        files=index["file"].astype(str).str.encode("utf-8").to_numpy().astype("S"), boxes=box_arr,
        box_size=box_size, sample_study=sample_codes.astype(np.int32),
        sample_slice=samples["slice_index"].to_numpy(np.int32), sample_sop=samples[SOP].to_numpy(str),
        label=label, exam=exam)


def load_slice(table: SliceTable, code: int, k: int, cfg: CNNConfig, center: int | None = None,
               raw: bool = False) -> np.ndarray:
    """(img_size, img_size, 3) uint8: slice k of study ``code`` read from the cache, cropped (when
    ``cfg.crop_lung``: the lung box, or the ROI box of slice ``center``, k by default) and resized;
    the one place both the disk path and the preload read. ``raw``: the cached image as it is."""
    img = read_rgb(table.cache_dir / table.files[int(table.study_start[code]) + k].decode())
    if raw:
        return img
    if roi_mode(cfg) is not None:
        box = table.roi_box(code, k if center is None else center, img.shape[0], cfg)
    else:
        box = table.box(code, img.shape[0]) if cfg.crop_lung else None
    return crop_resize(img, box, cfg.img_size)


def per_centre_crop(cfg: CNNConfig) -> bool:
    """Whether a slice's crop depends on the input's centre slice (ROI per slice or slab): then the
    preload keeps the cached images uncropped and crops each input on the fly."""
    return roi_mode(cfg) in ("slice", "slab")


class SliceDataset(Dataset):
    """Samples of a :class:`SliceTable` as ``{"image", "label", "exam", "index"}``.

    Keys are ints or ``(int, seed)`` pairs from :class:`EpochBatchSampler`; the seed fixes the
    augmentation of that sample, so an epoch's augmentations do not depend on worker count or on
    where a resumed run restarted.
    """

    def __init__(self, table: SliceTable, cfg: CNNConfig, augment: A.Compose | None = None,
                 preload: bool = False, workers: int = 2, masks: Any = None) -> None:
        self.table = table
        self.cfg = cfg
        self.augment = augment
        # pe.data.annotations.SampleMasks: samples also carry "mask" (uint8 H, W, augmented with the
        # image) and "annotated" (bool) for the attention loss
        self.masks = masks
        if masks is not None and roi_mode(cfg) is not None:
            raise ValueError(f"crop_mode={cfg.crop_mode}: the attention masks (pe.data.annotations) follow the "
                             "lung box only; use crop_mode=lung with attention_lambda > 0")
        if roi_mode(cfg) is not None and len(table.studies):
            table.roi_box(0, 0, 1, cfg)  # load rois.parquet once, before DataLoader workers fork
        # (n_files, img_size, img_size, 3) uint8 when preloaded: every cached slice of the table's
        # studies (neighbours included), cropped and resized once. DataLoader workers share it
        # copy-on-write; samples are bit-identical to the disk path (tested).
        self.slices: np.ndarray | None = preload_slices(table, cfg, workers) if preload else None

    def __len__(self) -> int:
        return len(self.table)

    def load_stack(self, i: int) -> np.ndarray:
        """(img_size, img_size, C) uint8 of sample i: centre slice and neighbours from the cache,
        each cropped and resized before stacking (cheaper than stacking full-size slices; the
        result is identical because crop and resize act on each slice's channels separately)."""
        t = self.table
        code, center = int(t.sample_study[i]), int(t.sample_slice[i])
        s0, n = int(t.study_start[code]), int(t.study_len[code])
        idx = neighbor_indices(center, n, self.cfg.neighbors)
        if self.slices is not None and per_centre_crop(self.cfg):  # uncropped preload: crop here
            box = t.roi_box(code, center, self.slices.shape[1], self.cfg)
            return np.concatenate([crop_resize(self.slices[s0 + k], box, self.cfg.img_size) for k in idx], axis=-1)
        if self.slices is not None:
            return np.concatenate([self.slices[s0 + k] for k in idx], axis=-1)
        slices: dict[int, np.ndarray] = {}
        for k in idx:  # edge repeats decode once
            if k not in slices:
                slices[int(k)] = load_slice(t, code, int(k), self.cfg, center)
        return np.concatenate([slices[int(k)] for k in idx], axis=-1)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """``image`` is uint8 (C, H, W): normalise with :func:`normalize` (the trainer does, on the device)."""
        i, seed = (key, None) if isinstance(key, (int, np.integer)) else key
        arr = self.load_stack(int(i))
        mask = None
        if self.masks is not None:
            mask = self.masks.mask(self.table, int(i), self.cfg.crop_lung, arr.shape[0])
        if self.augment is not None:
            if seed is not None:
                self.augment.set_random_seed(int(seed))
            if mask is None:
                arr = self.augment(image=arr)["image"]
            else:  # the same draw moves the mask with the image (albumentations mask target)
                out = self.augment(image=arr, mask=mask)
                arr, mask = out["image"], out["mask"]
        item = {"image": to_uint8_tensor(arr), "label": torch.tensor(self.table.label[i]),
                "exam": torch.from_numpy(self.table.exam[i]), "index": torch.tensor(int(i))}
        if mask is not None:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(mask))
            item["annotated"] = torch.tensor(bool(self.masks.annotated[i]))
        return item


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def preload_slices(table: SliceTable, cfg: CNNConfig, workers: int = 2) -> np.ndarray:
    """Every cached slice of ``table`` cropped and resized once, as one (n_files, S, S, 3) uint8 array.

    For small data (the phantom, a subset, a big-RAM box): it removes JPEG decoding from every
    epoch, which on a CPU costs as much as the tiny demo model's step. Refuses (ValueError) when the
    array would take more than half of the available memory. OpenCV releases the GIL, so a thread
    pool decodes in parallel without copying the table into processes."""

    n, s = len(table.files), cfg.img_size
    raw = per_centre_crop(cfg)
    if raw and n:
        s = read_rgb(table.cache_dir / table.files[0].decode()).shape[0]  # the cache's size
    need = n * s * s * 3
    avail = available_memory_bytes()
    if avail is not None and need > avail // 2:
        raise ValueError(f"preload of {n} slices at {s} px needs {need / 2**30:.1f} GiB, more than half of the "
                         f"{avail / 2**30:.1f} GiB available: set preload=false (read from {table.cache_dir})")
    out = np.empty((n, s, s, 3), dtype=np.uint8)
    codes = np.repeat(np.arange(len(table.studies)), table.study_len)

    def one(j: int) -> None:
        code = int(codes[j])
        out[j] = load_slice(table, code, j - int(table.study_start[code]), cfg, raw=raw)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(one, range(n), chunksize=64))
    return out


def epoch_plan(labels: np.ndarray, epoch: int, seed: int, pos_oversample: float = 1.0,
               neg_frac: float = 1.0) -> np.ndarray:
    """The shuffled sample indices of one epoch (identical on every rank: depends on seed and epoch).

    Positives appear ``pos_oversample`` times on average (the fractional part by random draw),
    negatives are a random ``neg_frac`` subset drawn anew each epoch — the sampling most top teams
    used to balance the ~5 % positive slices of RSPECT without discarding negatives for good.
    """
    rng = np.random.default_rng([seed, epoch, 7919])
    pos = np.flatnonzero(labels > 0.5)
    neg = np.flatnonzero(~(labels > 0.5))
    reps = int(np.floor(pos_oversample))
    parts = [np.tile(pos, reps)]
    extra = pos_oversample - reps
    if extra > 0 and len(pos):
        parts.append(rng.choice(pos, size=int(round(extra * len(pos))), replace=False))
    n_neg = len(neg) if neg_frac >= 1 else int(round(neg_frac * len(neg)))
    parts.append(neg if n_neg == len(neg) else rng.choice(neg, size=n_neg, replace=False))
    plan = np.concatenate(parts).astype(np.int64)
    return plan[rng.permutation(len(plan))]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Per-rank batches of ``(sample index, augmentation seed)`` for one epoch, DDP-aware.

    The epoch plan (:func:`epoch_plan`) is cut into global batches of ``batch_size * world_size``;
    each global batch is dealt round-robin to the ranks, so every planned sample is seen exactly
    once across ranks and every rank runs the same number of batches (DDP needs that). A final
    global batch too small to give each rank two samples (BatchNorm needs two) is dropped: at most
    ``2·world_size − 1`` samples per epoch. ``start_batch`` skips batches already done before a
    mid-epoch resume.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int, pos_oversample: float = 1.0,
                 neg_frac: float = 1.0, rank: int = 0, world_size: int = 1) -> None:
        self.labels = np.asarray(labels)
        self.batch_size = batch_size
        self.seed = seed
        self.pos_oversample = pos_oversample
        self.neg_frac = neg_frac
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def global_batches(self) -> list[np.ndarray]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        plan = epoch_plan(self.labels, self.epoch, self.seed, self.pos_oversample, self.neg_frac)
        g = self.batch_size * self.world_size
        batches = [plan[i:i + g] for i in range(0, len(plan), g)]
        if batches and len(batches[-1]) < 2 * self.world_size:
            batches.pop()
        self._cache = (self.epoch, batches)
        return batches

    def planned_samples(self) -> np.ndarray:
        """Every sample index this epoch delivers across all ranks (for tests and logs)."""
        b = self.global_batches()
        return np.concatenate(b) if b else np.zeros(0, dtype=np.int64)

    def batches_per_epoch(self) -> int:
        return len(self.global_batches())

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = self.batch_size * self.world_size
        for b, batch in enumerate(self.global_batches()):
            if b < self.start_batch:
                continue
            pos0 = b * g
            mine = range(self.rank, len(batch), self.world_size)
            # One seed per (seed, epoch, position in the plan): reproducible across resume/workers.
            yield [(int(batch[j]), int(np.random.SeedSequence([self.seed, self.epoch, pos0 + j]).generate_state(1)[0]))
                   for j in mine]


def shard_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Validation batches of this rank: a strided shard of 0..n-1 (no padding, no drop)."""
    mine = list(range(rank, n, world_size))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def worker_init_fn(worker_id: int) -> None:
    """Seed numpy per worker and keep OpenCV single-threaded (workers are the parallelism)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed((seed + worker_id) % 2**32)
    cv2.setNumThreads(1)


