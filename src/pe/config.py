"""One config system for every stage: a typed dataclass default, one small YAML per experiment,
``key=value`` command-line overrides on top, and the resolved config written into the run folder.

    cfg = load_config(CNNConfig, "src/configs/demo.yaml", ["lr=1e-3", "epochs=2"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pe import paths
from pe.io import write_text_atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override names an unknown key or a value of the wrong type."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the dataclass field type (int, float, bool, str, list, Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            value = [value]
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(float(value)) if tp is int and isinstance(value, str) and "e" in value.lower() else tp(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from e
    return value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-3", "aug_affine_p=0.5"]`` → ``{"lr": 1e-3, ...}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        out[key.strip().lstrip("-").replace("-", "_")] = yaml.safe_load(raw)
    return out


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error naming ``source``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{source}:{k}") for k, v in values.items()}
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Dataclass defaults, then the YAML file at ``path``, then ``key=value`` overrides."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        values.update(loaded)
        source = str(p)
    values.update(parse_overrides(overrides))
    return from_dict(cls, values, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically) so a run folder says how it was made."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------- experiment configs

@dataclass
class CNNConfig:
    """All options of one CNN experiment; defaults are a reasonable real-data starting point."""

    name: str = "cnn"  # experiment name: work/models/<name>/fold<k>, oof/<name>/
    seed: int = 42
    # --- data ---
    cache_size: int = 512  # which cache to read when cache_dir is not given: paths.cache_dir(cache_size)
    cache_dir: str | None = None
    meta_train: str | None = None  # default paths.meta_path("train")
    folds_path: str | None = None  # default paths.folds_path()
    img_size: int = 512
    neighbors: int = 1  # slices on each side of the centre slice
    crop_lung: bool = True
    # which box crop_lung crops to: lung (the study's lung box, boxes.csv) | roi_slice | roi_slab |
    # roi_study (lungs ∪ heart ROI of CACHE/rois.parquet per slice, its union over ±crop_roi_slab
    # slices, or over the study; pe.anatomy.roi). The neighbours of a slice share its crop.
    crop_mode: str = "lung"
    crop_roi_slab: int = 5
    # --- model ---
    backbone: str = "tf_efficientnetv2_s"
    pretrained: bool = False  # timm's cache (no download possible offline)
    pretrained_path: str | None = None  # local state_dict file; first conv adapted to in_chans
    drop_rate: float = 0.2  # dropout before the heads
    drop_path_rate: float = 0.1
    exam_heads: bool = False
    global_pool: str = "avg"  # timm pooling of the last feature map: avg | max | avgmax
    # timm output_stride: 16 or 8 dilate the last stage(s) instead of striding them, so the last
    # feature map (Grad-CAM's, the pooled one) keeps 2x / 4x the resolution for small emboli; 32 = off
    # (timm models without the argument, e.g. MobileNetV3 or ViT, are refused by name)
    output_stride: int = 32
    # landmark pretraining (papers/condrea2023; src/13_pretrain_landmarks.py): the backbone starts from
    # work/models/<init_from>/backbone.pt (a pretrained_path resolved in the run's work folder)
    init_from: str | None = None
    # dual-hop model (papers/condrea2023 Fig. 5; pe.models.dual_hop): hop 1 = the frozen best.pt of
    # experiment <hop1_exp> for the same fold; this experiment trains the aggregator and hop 2
    hop1_exp: str | None = None
    # --- augmentation (applied to the channel-stacked array: identical on every stacked slice) ---
    aug: bool = True
    aug_hflip_p: float = 0.0
    aug_affine_p: float = 0.7
    aug_scale: float = 0.15
    aug_shift: float = 0.08
    aug_rotate: float = 15.0
    aug_brightness_p: float = 0.5
    aug_brightness: float = 0.15
    aug_contrast: float = 0.15
    aug_cutout_p: float = 0.5
    aug_cutout_holes: int = 2
    aug_cutout_size: float = 0.3  # max hole side as a fraction of the image
    # --- optimisation ---
    epochs: int = 10
    batch_size: int = 32  # per GPU / process
    accum_steps: int = 1
    lr: float = 4e-4
    min_lr: float = 1e-6
    weight_decay: float = 1e-2
    warmup_epochs: float = 0.5
    loss: str = "bce"  # bce | focal
    focal_gamma: float = 2.0
    pos_weight: float = 1.0
    exam_loss_weight: float = 0.5
    pos_oversample: float = 1.0  # positive slices per epoch, as a multiple of their count
    neg_per_epoch_frac: float = 1.0  # fraction of negative slices drawn (anew) per epoch
    grad_clip: float = 0.0  # max grad norm; 0 = off
    ema: bool = False
    ema_decay: float = 0.999
    amp: bool = True  # CUDA only
    amp_dtype: str = "fp16"  # fp16 (GradScaler; P100/V100/T4) | bf16 (A100+)
    # bf16 autocast on the CPU as well (training, validation, embedding export): oneDNN runs the
    # convolutions in bf16 on CPUs with AMX / AVX512-BF16 (make bench-loader prints the step ratio).
    # Off everywhere: on the demo it made the CNN stage 1.35x faster but cost pooled OOF slice AUC
    # (0.837 vs 0.876, README demo section).
    cpu_amp: bool = False
    channels_last: bool = True  # NHWC activations: cuDNN on CUDA, oneDNN on the CPU (make bench-loader)
    compile: bool = False  # torch.compile the training forward (CUDA or CPU; make bench-gpu measures it)
    # --- run ---
    num_workers: int = 4
    val_batch_size: int = 64
    val_every: int = 1  # validate (and maybe save best.pt) every N epochs and after the last one
    preload: bool = False  # decode + crop + resize every slice once into RAM (small data: phantom, subsets)
    save_every_steps: int = 0  # also write last.pt every N optimizer steps (mid-epoch resume)
    progress: bool = True
    threads: int = 0  # torch CPU threads per process; 0 = torch default
    # --- attention supervision (papers/shi2020 section 2.1; pe.train.attention) ---
    attention_lambda: float = 0.0  # lambda of L_CE + lambda * L_CDC(Grad-CAM, embolus mask); 0 = off (paper 1.0)
    attention_source: str | None = None  # box CSV or folder of <SOP>.png masks; default <data>/train_boxes.csv
    attention_studies_frac: float = 1.0  # share of the annotated studies whose annotations are used
    attention_every_mm: float = 0.0  # one annotated slice every ~N mm in those studies (0 = every slice)
    attention_negatives: bool = True  # negative slices train the map towards zero (known empty mask)
    attention_smooth: float = 1.0  # additive smoothing of the continuous Dice (feature-map cells)
    # dotted module name whose output the attention's Grad-CAM reads (e.g. backbone.layer3: a finer map
    # than the last one); default the model's gradcam_layer (the last feature map, as in the paper). With an
    # earlier block, the batch norms after it couple the samples in training mode (batch statistics), so
    # the in-graph CAM is each sample's own only up to O(1/batch) terms; the last map has none after it.
    attention_layer: str | None = None
    # --- debug (tests) ---
    stop_after_steps: int = 0  # raise after N optimizer steps, as a crash would (resume tests)
    debug_sample_log: str | None = None  # folder: each rank appends the sample ids it trained on


GLOBAL_POOLS = ("avg", "max", "avgmax")
OUTPUT_STRIDES = (8, 16, 32)


def parse_folds(text: str) -> list[int]:
    """``--fold`` of stages 04 and 06: one fold (``"0"``, ``"-1"``) or a comma-separated list
    (``"0,1,2"``), trained one after the other in one process; duplicates are an error."""
    try:
        folds = [int(t) for t in str(text).split(",") if t.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fold wants integers like 0 or 0,1,2, got {text!r}") from None
    if not folds or len(set(folds)) != len(folds):
        raise argparse.ArgumentTypeError(f"--fold wants distinct integers like 0 or 0,1,2, got {text!r}")
    return folds


def resolve_paths(cfg: CNNConfig) -> tuple[Path, Path, Path]:
    """(cache_dir, meta_train, folds_path) with the paths.py defaults filled in."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else paths.cache_dir(cfg.cache_size)
    meta = Path(cfg.meta_train) if cfg.meta_train else paths.meta_path("train")
    folds = Path(cfg.folds_path) if cfg.folds_path else paths.folds_path()
    return cache, meta, folds


@dataclass
class SeqConfig:
    """One stage-2 experiment; YAML files in src/configs/seq_*.yaml override these defaults."""

    name: str = "seq"
    cnn_exp: str = ""  # stage-1 experiment whose embeddings are read (work/embeddings/<cnn_exp>/); required to train
    # Which CNN embeds fold k's training studies. oof: their own out-of-fold CNNs (other models than
    # the fold-k CNN that embeds the validation and test studies: independently trained CNNs do not share
    # an embedding basis, which matters most with 2 folds). fold_model: the fold-k CNN itself (in-sample;
    # 05_export_embeddings.py --split train_fit), so train, validation and test share one space.
    train_embeddings: str = "oof"
    # With fold_model, whose slice probabilities the training studies carry (the use_prob feature, the
    # cnn_skip logit and the evidence heads' pooled logits). embeddings: the fold-k CNN's own, in-sample
    # (over-confident where that CNN fits its training studies closely). oof: the out-of-fold CNNs'
    # (as calibrated as the validation and test probabilities), the embeddings staying fold k's.
    train_probs: str = "embeddings"
    rnn: str = "gru"  # gru | lstm
    layers: int = 2  # 1 or 2 bidirectional layers
    hidden: int = 128  # per direction; the sequence features h_k have 2*hidden channels
    attn_dim: int = 64  # V in the attention pooling maps 2*hidden -> attn_dim
    dropout: float = 0.2  # between RNN layers and before the heads
    input_dropout: float = 0.1  # on the standardised per-slice input
    use_diff: bool = True  # append e_k - e_{k-1} and e_k - e_{k+1}
    use_prob: bool = True  # append the CNN slice probability
    # Inductive bias for small data (issue 14): paths from the CNN's own slice evidence to the heads.
    cnn_skip: bool = False  # image logit = head(h) + w * logit(CNN prob); starts at the CNN (head zeroed, w = 1)
    evidence_heads: bool = False  # exam logits += a linear map of pooled CNN slice logits (max, top-k mean,
    #   mean), initialised by a per-label logistic regression on the training studies; the RNN's own exam
    #   head starts at zero and learns the rest
    evidence_topk: int = 5  # k of the top-k mean
    # P(label) = P(PE exam) x P(label | PE exam) for the seven positive-only labels, with P(PE exam) =
    # (1 - P(negative_exam_for_pe)) (1 - P(indeterminate)): the heads learn the conditional share
    conditional_heads: bool = False
    lr: float = 1e-3
    weight_decay: float = 1e-2
    epochs: int = 30
    warmup_epochs: int = 1
    batch_size: int = 16
    min_lr_ratio: float = 0.05  # the cosine schedule ends at this share of lr
    patience: int = 8  # epochs without a better validation metric before stopping
    grad_clip: float = 1.0
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default
    folds_path: str | None = None  # default paths.folds_path(); used to check the embeddings' folds
    progress: bool = True  # tqdm bars


@dataclass
class ConvLSTMSeqConfig:
    """One stage-2 ConvLSTM experiment over exported reduced feature maps (papers/shi2020 section 2.2;
    :mod:`pe.train.convlstm`). ``src/06_train_sequence.py`` picks it for a YAML with ``model: convlstm``;
    the maps are those of ``src/05_export_embeddings.py --exp <cnn_exp> --maps`` (their reduction is
    read from the export and stored in the checkpoint)."""

    name: str = "seq_convlstm"
    model: str = "convlstm"  # the key src/06_train_sequence.py dispatches on
    cnn_exp: str = ""  # stage-1 experiment whose embeddings/maps are read; required to train
    train_embeddings: str = "oof"  # oof | fold_model: whose maps fold k trains on (see SeqConfig)
    hidden: int = 96  # ConvLSTM filters (paper: 96)
    kernel: int = 3  # (paper: 3x3)
    units: int = 2  # ascending + descending ConvLSTM, then 2x2 max pooling (paper: 2)
    dropout: float = 0.2  # channel dropout on inputs and recurrent states (paper: 0.2)
    head_dropout: float = 0.5  # before the heads (paper: 0.5)
    attn_dim: int = 64
    cnn_skip: bool = False  # image logit += w * logit(CNN slice prob), as SeqConfig.cnn_skip
    lr: float = 1e-3
    weight_decay: float = 1e-2
    epochs: int = 30
    warmup_epochs: int = 1
    batch_size: int = 8
    min_lr_ratio: float = 0.05
    patience: int = 8
    grad_clip: float = 1.0
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0
    folds_path: str | None = None  # default paths.folds_path(); used to check the maps' folds
    progress: bool = True
