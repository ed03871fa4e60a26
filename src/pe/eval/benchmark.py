"""The logic of the quality benchmark (``bench/bench_quality.py``, ``make bench-quality``) worth testing on its
own: variant specs, the held-out split of a data folder, every figure with its bootstrap interval over studies.

Why per-study weights: every figure (the competition metric, its per-label contributions, the
AUCs) is a function of the multiset of held-out studies. A bootstrap resample is a vector of
multiplicities ``w`` (how often each study was drawn); the metric is then ``sum(w*num)/sum(w*den)``
over per-study numerators and denominators (exactly the competition's pooled weighted log loss,
not a mean of per-study losses) and an AUC is the weighted AUC with each row weighing its study's
multiplicity (identical to the AUC over duplicated rows). A *paired* comparison evaluates both
prediction sets on the same resample, so study-to-study difficulty cancels out of the difference.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pe import paths, rspect
from pe.data.tables import read_truth
from pe.eval import metric
from pe.eval.bootstrap import bootstrap_ci
from pe.eval.voting import EXAM_PE_HEADS
from pe.io import write_csv_atomic
from pe.rspect import EXAM_LABELS, ID_COLUMNS, IMAGE_LABEL, SOP, STUDY

BENCH_CONFIGS: Path = paths.CONFIGS_DIR / "bench"
_EXAM_W = np.asarray(rspect.EXAM_WEIGHT_VECTOR, dtype=np.float64)
_NEG = EXAM_LABELS.index("negative_exam_for_pe")
_IND = EXAM_LABELS.index("indeterminate")
LABELS: tuple[str, ...] = (IMAGE_LABEL, *EXAM_LABELS)


class BenchError(ValueError):
    """A variant file, data folder or prediction file the benchmark cannot use (message names it)."""


# ------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSpec:
    """One stage's config file (relative to the repository root) and ``key=value`` overrides."""

    config: str
    overrides: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "overrides": list(self.overrides)}


PRE_SCRIPTS: dict[str, str] = {"04": "src/04_train_cnn.py", "13": "src/13_pretrain_landmarks.py"}


@dataclass(frozen=True)
class PreStage:
    """A run the variant's CNN builds on, made in the same run folder before it: script ``04`` (a CNN
    on every fold, e.g. hop 1 of a dual-hop model, used through ``hop1_exp=<name>``) or ``13``
    (landmark pretraining, once, used through ``init_from=<name>``)."""

    script: str
    name: str
    spec: StageSpec

    def as_dict(self) -> dict[str, Any]:
        return {"script": self.script, "name": self.name, **self.spec.as_dict()}


@dataclass(frozen=True)
class Variant:
    """A named recipe: the stage-1 CNN (and the runs it builds on) and the stage-2 sequence members
    (ensembled by stage 07)."""

    name: str
    description: str
    cnn: StageSpec
    seq: tuple[StageSpec, ...]
    source: str
    before: tuple[PreStage, ...] = ()
    exam_pe_head: str = "sequence"  # stage 07 --exam-pe-head (pe.eval.voting.EXAM_PE_HEADS)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "source": self.source,
                "cnn": {**self.cnn.as_dict(), "before": [b.as_dict() for b in self.before]},
                "seq": [s.as_dict() for s in self.seq], "exam_pe_head": self.exam_pe_head}

    def cnn_key(self, extra: Sequence[str] = ()) -> str:
        """Variants whose stage 1 is identical (config bytes + overrides, and the runs it builds on)
        share its training."""
        text = (paths.REPO_ROOT / self.cnn.config).read_text() + "\n" + "\n".join([*self.cnn.overrides, *extra])
        for b in self.before:  # nothing added without them: the keys of earlier runs stay valid
            text += f"\nbefore {b.script} {b.name}\n" + (paths.REPO_ROOT / b.spec.config).read_text() + "\n" \
                + "\n".join(b.spec.overrides)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def _before(raw: Any, where: str) -> tuple[PreStage, ...]:
    if not isinstance(raw, list):
        raise BenchError(f"{where}: expected a list of {{script: 04|13, name: ..., config: ..., overrides: [...]}}")
    out = []
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(item, dict) or str(item.get("script")) not in PRE_SCRIPTS or not item.get("name"):
            raise BenchError(f"{w}: needs script (one of {sorted(PRE_SCRIPTS)}) and name")
        name = str(item["name"])
        if name == "cnn" or not name.replace("_", "").isalnum():
            raise BenchError(f"{w}: name must be letters, digits or _ and not 'cnn' (the variant's own CNN)")
        spec = _stage({k: v for k, v in item.items() if k not in ("script", "name")}, w)
        out.append(PreStage(str(item["script"]), name, spec))
    return tuple(out)


def _stage(raw: Any, where: str) -> StageSpec:
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), str):
        raise BenchError(f"{where}: expected a mapping with 'config: <path>' (and optional 'overrides: [k=v]')")
    unknown = sorted(set(raw) - {"config", "overrides"})
    if unknown:
        raise BenchError(f"{where}: unknown key(s) {unknown}")
    over = raw.get("overrides") or []
    if not isinstance(over, list) or not all(isinstance(o, str) and "=" in o for o in over):
        raise BenchError(f"{where}: overrides must be a list of 'key=value' strings, got {over!r}")
    if not (paths.REPO_ROOT / raw["config"]).is_file():
        raise BenchError(f"{where}: config file {raw['config']} not found (paths are relative to the repository)")
    return StageSpec(raw["config"], tuple(over))


def load_variant(name: str, configs_dir: Path = BENCH_CONFIGS, _seen: tuple[str, ...] = ()) -> Variant:
    """``<configs_dir>/<name>.yaml``; a missing ``cnn`` or ``seq`` is inherited from ``extends``
    (default ``baseline``), so a stage-2 variant names only its sequence members."""
    path = configs_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in configs_dir.glob("*.yaml"))
        raise BenchError(f"{path}: no such variant; known: {known}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise BenchError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise BenchError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - {"description", "extends", "cnn", "seq", "exam_pe_head"})
    if unknown:
        raise BenchError(f"{path}: unknown key(s) {unknown}; known: cnn, seq, exam_pe_head, extends, description")
    parent_name = raw.get("extends", None if name == "baseline" else "baseline")
    if parent_name in (*_seen, name):
        raise BenchError(f"{path}: 'extends' makes a cycle through {parent_name}")
    parent = load_variant(parent_name, configs_dir, (*_seen, name)) if parent_name else None
    if "cnn" in raw:
        raw_cnn = dict(raw["cnn"]) if isinstance(raw["cnn"], dict) else raw["cnn"]
        before = _before(raw_cnn.pop("before"), f"{path}: cnn.before") if isinstance(raw_cnn, dict) \
            and "before" in raw_cnn else ()
        cnn = _stage(raw_cnn, f"{path}: cnn")
    elif parent is not None:
        cnn, before = parent.cnn, parent.before
    else:
        raise BenchError(f"{path}: needs a 'cnn' stage (or 'extends')")
    if "seq" in raw:
        if not isinstance(raw["seq"], list) or not raw["seq"]:
            raise BenchError(f"{path}: seq must be a non-empty list of stage specs")
        seq = tuple(_stage(s, f"{path}: seq[{i}]") for i, s in enumerate(raw["seq"]))
    elif parent is not None:
        seq = parent.seq
    else:
        raise BenchError(f"{path}: needs 'seq' members (or 'extends')")
    head = str(raw.get("exam_pe_head", parent.exam_pe_head if parent is not None else "sequence"))
    if head not in EXAM_PE_HEADS:
        raise BenchError(f"{path}: exam_pe_head must be one of {list(EXAM_PE_HEADS)}, got {head!r}")
    return Variant(name, str(raw.get("description", "")), cnn, seq, str(path.relative_to(paths.REPO_ROOT))
                   if path.is_relative_to(paths.REPO_ROOT) else str(path), before, head)


# ------------------------------------------------------------------------------------------------
# Data: held-out split and fingerprint
# ------------------------------------------------------------------------------------------------
def fingerprint(files: Sequence[Path]) -> str:
    """SHA-256 over the label and id files (not the images: real RSPECT is ~1 TB)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def holdout_studies(truth: pd.DataFrame, share: float, seed: int) -> list[str]:
    """A seeded, stratified (PE positive / negative / indeterminate) share of the studies."""
    if not 0 < share < 1:
        raise BenchError(f"hold-out share must be in (0, 1), got {share}")
    exams = truth.drop_duplicates(STUDY)
    kind = np.where(exams["negative_exam_for_pe"] > 0.5, "neg", np.where(exams["indeterminate"] > 0.5, "ind", "pos"))
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for k in ("pos", "neg", "ind"):
        ids = np.sort(exams.loc[kind == k, STUDY].astype(str).to_numpy())
        n = int(round(len(ids) * share))
        out += rng.permutation(ids)[:n].tolist()
    if not out:
        raise BenchError(f"hold-out share {share} of {len(exams)} studies selects no study")
    return sorted(out)


def _study_folders(split_dir: Path) -> dict[str, Path]:
    if not split_dir.is_dir():
        raise BenchError(f"{split_dir}: no such folder (expected the RSPECT layout <dir>/train/<study>/...)")
    return {p.name: p for p in split_dir.iterdir() if p.is_dir()}


def mirror_tree(src: Path, dst: Path) -> None:
    """Real folders with a symlink per file: stage 01 walks the tree without following directory
    links (os.walk's default), so linking whole study folders would hide them."""
    src = src.resolve()
    for dirpath, _, filenames in os.walk(src):
        target = dst / Path(dirpath).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in filenames:
            link = target / name
            if not link.exists():
                link.symlink_to(Path(dirpath) / name)


def make_holdout_view(data_dir: Path, out: Path, share: float, seed: int) -> tuple[Path, Path]:
    """A derived RSPECT-layout folder ``out`` whose train/ and test/ mirror the study folders of
    ``data_dir/train`` (training part / held-out part) with a symlink per file, with a filtered train.csv, a test.csv and
    ``heldout_truth.csv``; ``train_boxes.csv`` is linked when present. Returns (out, truth file)."""
    src = data_dir / "train.csv"
    truth = read_truth(src)
    held = set(holdout_studies(truth, share, seed))
    folders = _study_folders(data_dir / "train")
    missing = sorted(set(truth[STUDY].astype(str)) - set(folders))
    if missing:
        raise BenchError(f"{data_dir / 'train'}: {len(missing)} studies of train.csv have no folder, e.g. {missing[:3]}")
    for split in ("train", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
    for study in sorted(set(truth[STUDY].astype(str))):
        mirror_tree(folders[study], out / ("test" if study in held else "train") / study)
    is_held = truth[STUDY].astype(str).isin(held)
    write_csv_atomic(truth.loc[~is_held], out / "train.csv")
    write_csv_atomic(truth.loc[is_held, list(ID_COLUMNS)], out / "test.csv")
    truth_file = out / "heldout_truth.csv"
    write_csv_atomic(truth.loc[is_held], truth_file)
    for extra in ("train_boxes.csv", "phantom_landmarks.csv"):  # annotations of the training studies
        src_extra = data_dir / extra
        if src_extra.is_file() and not (out / extra).exists():
            (out / extra).symlink_to(src_extra.resolve())
    return out, truth_file


# ------------------------------------------------------------------------------------------------
# Per-study parts of every figure
# ------------------------------------------------------------------------------------------------
@dataclass
class StudyParts:
    """Everything a figure needs, per held-out study, for one prediction set (scorer order)."""

    num: np.ndarray  # (n, 10) weighted BCE sums per label (image label first)
    den: np.ndarray  # (n,) the study's total weight
    image_study: np.ndarray  # (m,) study index per image row
    image_truth: np.ndarray
    image_prob: np.ndarray
    exam_truth: np.ndarray  # (n, 9)
    exam_prob: np.ndarray  # (n, 9)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.den)

    def auc(self, key: str) -> Callable[[np.ndarray], float]:
        """``w -> AUC`` of ``image_auc``, ``study_pe_auc`` or ``auc:<exam label>`` (rows weighted by
        their study's multiplicity), ranked once and kept."""
        if key not in self.extra:
            if key == "image_auc":
                a = WeightedAUC(self.image_truth, self.image_prob)
                self.extra[key] = lambda w: a(w[self.image_study])
            elif key == "study_pe_auc":
                has_pe, det = study_truth(self)
                b = WeightedAUC(has_pe[det], 1.0 - self.exam_prob[det, _NEG])
                self.extra[key] = lambda w: b(w[det])
            elif key.startswith("auc:"):
                j = EXAM_LABELS.index(key[4:])
                self.extra[key] = WeightedAUC(self.exam_truth[:, j], self.exam_prob[:, j])
            else:
                raise KeyError(key)
        return self.extra[key]


def study_parts(scorer: metric.Scorer, pred: pd.DataFrame) -> StudyParts:
    """Align a long ``id,label`` frame to ``scorer`` (all its studies must be there) and split the
    metric into per-study numerators and denominators."""
    ip, ep = scorer.align(pred)
    ip = np.asarray(ip, dtype=np.float64)
    ep = np.asarray(ep, dtype=np.float64)
    n = scorer.n_studies
    num = np.zeros((n, len(LABELS)))
    num[:, 0] = np.bincount(scorer.image_study, weights=scorer.image_weight * metric.bce(scorer.image_truth, ip),
                            minlength=n)
    num[:, 1:] = metric.bce(scorer.exam_truth, ep) * _EXAM_W
    den = np.bincount(scorer.image_study, weights=scorer.image_weight, minlength=n) + _EXAM_W.sum()
    return StudyParts(num, den, scorer.image_study, scorer.image_truth, ip, scorer.exam_truth, ep)


class WeightedAUC:
    """ROC AUC of fixed labels and scores under changing row weights (integer weights = duplicated
    rows, as a bootstrap resample makes them). Scores are ranked once; each call costs two
    bincounts and a cumsum instead of a sort, which is what makes 1,000 resamples of every figure
    cheap. Ties count one half, as in sklearn's roc_auc_score."""

    def __init__(self, y: np.ndarray, s: np.ndarray) -> None:
        self.y = np.asarray(y) > 0.5
        _, self.group = np.unique(np.asarray(s, dtype=np.float64), return_inverse=True)
        self.n_groups = int(self.group.max()) + 1 if len(self.group) else 0

    def __call__(self, w: np.ndarray | None = None) -> float:
        w = np.ones(len(self.y)) if w is None else np.asarray(w, dtype=np.float64)
        wp = np.bincount(self.group, weights=w * self.y, minlength=self.n_groups)
        wn = np.bincount(self.group, weights=w * ~self.y, minlength=self.n_groups)
        tot_p, tot_n = wp.sum(), wn.sum()
        if tot_p <= 0 or tot_n <= 0:
            return float("nan")  # AUC is undefined with one class
        below = np.cumsum(wn) - wn
        return float(wp @ (below + 0.5 * wn) / (tot_p * tot_n))


def weighted_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray | None = None) -> float:
    """ROC AUC with sample weights (integer weights = duplicated rows); NaN with one class."""
    return WeightedAUC(y, s)(w)


def figures(p: StudyParts, w: np.ndarray | None = None) -> dict[str, float]:
    """Every figure of one prediction set for study multiplicities ``w`` (None: each study once):
    ``score``, ``loss:<label>`` (contributions, summing to the score), ``auc:<label>``,
    ``study_pe_auc`` (1 - P(negative) against "has a positive image", indeterminate left out, as in
    :func:`pe.eval.metric.breakdown_arrays`) and ``image_auc``."""
    w = np.ones(p.n) if w is None else np.asarray(w, dtype=np.float64)
    contrib = (w @ p.num) / float(w @ p.den)
    out = {"score": float(contrib.sum())}
    out.update({f"loss:{lab}": float(c) for lab, c in zip(LABELS, contrib, strict=True)})
    for key in ("image_auc", "study_pe_auc", *(f"auc:{lab}" for lab in EXAM_LABELS)):
        out[key] = p.auc(key)(w)
    return out


def slice_auc_stat(image_study: np.ndarray, truth: np.ndarray, prob: np.ndarray) -> Callable[[np.ndarray], float]:
    """``w -> slice AUC`` of any per-image score (the CNN alone) under study multiplicities ``w``."""
    a = WeightedAUC(truth, prob)
    return lambda w: a(np.asarray(w, dtype=np.float64)[image_study])


# ------------------------------------------------------------------------------------------------
# Intervals
# ------------------------------------------------------------------------------------------------
Stat = Callable[[np.ndarray], float]


def ci(n_studies: int, stat: Stat, n_boot: int, seed: int) -> dict[str, float]:
    """Point estimate and 95 % percentile interval of ``stat(w)`` over bootstrap resamples of the
    studies (``w``: multiplicities), through :func:`pe.eval.bootstrap.bootstrap_ci`."""
    r = bootstrap_ci(np.arange(n_studies), lambda idx: stat(np.bincount(idx, minlength=n_studies)), n_boot, seed)
    return {"estimate": r.estimate, "low": r.low, "high": r.high, "n_valid": r.n_valid}


def mean_over(stats: Sequence[Stat]) -> Stat:
    """The mean over seeds of a per-seed statistic, on one shared resample (seeds are paired)."""
    return lambda w: float(np.mean([s(w) for s in stats]))


def paired_difference(a: Sequence[Stat], b: Sequence[Stat]) -> Stat:
    """mean_s a_s(w) - b_s(w): variant minus baseline, seed by seed, on the same resampled studies."""
    if len(a) != len(b):
        raise ValueError(f"paired difference needs the same seeds on both sides, got {len(a)} and {len(b)}")
    return lambda w: float(np.mean([x(w) - y(w) for x, y in zip(a, b, strict=True)]))


def ranked_by(scored: StudyParts, beliefs: StudyParts) -> StudyParts:
    """The metric's parts of ``scored`` (the submission after the consistency repair) with the ranking
    figures (AUCs) taken from ``beliefs`` (the same predictions before the repair). The repair moves
    every value it changes to exactly the 0.5 boundary, which ties all the studies it moves: on a weak
    model that collapses the study ranking (every exam PE at 0.5, AUC 0.5) although the model's
    beliefs still order the studies. AUCs measure ranking, so they read the beliefs; the metric reads
    what would be submitted."""
    if scored.num.shape != beliefs.num.shape or not np.array_equal(scored.image_study, beliefs.image_study):
        raise ValueError("ranked_by needs two prediction sets aligned to the same scorer")
    return replace(scored, image_prob=beliefs.image_prob, exam_prob=beliefs.exam_prob, extra={})


CALL_KEYS: tuple[str, ...] = ("sensitivity", "specificity", "ppv", "npv", "f1")


def study_truth(parts: StudyParts) -> tuple[np.ndarray, np.ndarray]:
    """(has a positive image, determinate) per held-out study: the study-level PE truth, and the
    studies it is defined on (indeterminate ones left out, as in ``study_pe_auc``)."""
    has_pe = np.bincount(parts.image_study, weights=parts.image_truth, minlength=parts.n) > 0
    return has_pe, parts.exam_truth[:, _IND] < 0.5


def call_stats(parts: StudyParts, called: np.ndarray) -> dict[str, Stat]:
    """Study-level sensitivity, specificity, PPV, NPV and F1 of a yes/no PE call per held-out study
    (papers/condrea2023 Tables; the voting head's figures), as bootstrap statistics over studies."""
    y, det = study_truth(parts)
    c = np.asarray(called, dtype=bool)
    if c.shape != y.shape:
        raise ValueError(f"need one call per held-out study ({len(y)}), got {c.shape}")
    cells = {k: (det & m).astype(np.float64) for k, m in
             {"tp": y & c, "fp": ~y & c, "fn": y & ~c, "tn": ~y & ~c}.items()}

    def ratio(num: Sequence[str], den: Sequence[str], scale: float = 1.0) -> Stat:
        def f(w: np.ndarray) -> float:
            a = sum(float(w @ cells[k]) for k in num) * scale
            b = sum(float(w @ cells[k]) for k in den)
            return a / b if b > 0 else float("nan")
        return f

    return {"sensitivity": ratio(["tp"], ["tp", "fn"]), "specificity": ratio(["tn"], ["tn", "fp"]),
            "ppv": ratio(["tp"], ["tp", "fp"]), "npv": ratio(["tn"], ["tn", "fn"]),
            "f1": ratio(["tp"], ["tp", "tp", "fp", "fn"], 2.0)}


def figure_stat(parts: StudyParts, key: str) -> Stat:
    """``w -> figures(parts, w)[key]`` without computing the other figures (AUCs are the slow part)."""
    if key == "score":
        return lambda w: float((w @ parts.num).sum() / (w @ parts.den))
    if key.startswith("loss:"):
        j = LABELS.index(key[5:])
        return lambda w: float((w @ parts.num[:, j]) / (w @ parts.den))
    return parts.auc(key)


def seed_spread(values: Sequence[float]) -> dict[str, Any]:
    """Seed-to-seed spread of a figure: the values, their standard deviation (ddof=1) and range."""
    v = np.asarray(values, dtype=float)
    return {"values": [float(x) for x in v], "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "range": float(v.max() - v.min()) if len(v) else float("nan")}


def fold_average(index_files: Sequence[Path]) -> pd.DataFrame:
    """The CNN's slice probabilities on the held-out studies averaged over the fold models (stage 05's
    ``embeddings/<exp>/fold<k>/test/index.parquet``), as the kernel averages folds."""
    if not index_files:
        raise BenchError("no test embedding index files (stage 05 --split test) to average")
    frames = [pd.read_parquet(f, columns=[STUDY, SOP, "prob"]) for f in index_files]
    df = pd.concat(frames, ignore_index=True)
    return df.groupby([STUDY, SOP], sort=False, as_index=False)["prob"].mean()


def env_for(work: Path, oof: Path, data: Path, reports: Path) -> dict[str, str]:
    """The environment that points every stage (src/pe/paths.py) at one run's folders."""
    env = dict(os.environ)
    env.update(PE_DATA_DIR=str(data), PE_WORK_DIR=str(work), PE_OOF_DIR=str(oof), PE_REPORTS_DIR=str(reports),
               PE_SUBMISSIONS_DIR=str(work / "submissions"))
    return env


def label_rows(results: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(label, loss contribution) of a figures dict, image label first (for the per-label bars)."""
    return [(lab, float(results[f"loss:{lab}"]["estimate"])) for lab in LABELS]


def fingerprint_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _config_value(spec: StageSpec, key: str, extra: Sequence[str], default: Any) -> Any:
    """A config key as the stage will see it: extra overrides, then the spec's, then the YAML."""
    from pe.config import parse_overrides

    over = parse_overrides([*spec.overrides, *extra])
    if key in over:
        return over[key]
    raw = yaml.safe_load((paths.REPO_ROOT / spec.config).read_text()) or {}
    return raw.get(key, default)


def config_seed(spec: StageSpec) -> int:
    """The stage's own seed; run seed s trains with config seed + s."""
    return int(_config_value(spec, "seed", (), 42))


def needs_maps(variants: Sequence[Variant], extra: Sequence[str] = ()) -> bool:
    """Whether a sequence member of these variants is a ConvLSTM (``model: convlstm``), which reads the
    reduced feature maps that ``05_export_embeddings.py --maps`` writes."""
    return any(str(_config_value(m, "model", extra, "")) == "convlstm" for v in variants for m in v.seq)


def needs_fit_export(variants: Sequence[Variant], extra: Sequence[str] = ()) -> bool:
    """Whether a sequence member reads its training studies' embeddings from the fold's own CNN
    (``train_embeddings: fold_model``), which ``05_export_embeddings.py --split train_fit`` writes."""
    return any(str(_config_value(m, "train_embeddings", extra, "oof")) == "fold_model"
               for v in variants for m in v.seq)


def cache_size(spec: StageSpec, extra: Sequence[str] = ()) -> int:
    """The JPEG cache size a CNN spec reads (stage 02 must make it)."""
    from pe.config import CNNConfig

    return int(_config_value(spec, "cache_size", extra, CNNConfig.cache_size))
