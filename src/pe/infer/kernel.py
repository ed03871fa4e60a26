"""Streaming study-by-study inference straight from DICOMs: the logic of the Kaggle kernel
(``kernels/rsna-pe-inference/inference.py``), also runnable locally on CPU.

Per study, in z order:

1. worker processes (:mod:`pe.infer.studies`) decode the DICOMs and build exactly the cache's model input
   (:func:`pe.data.cache.slice_to_rgb`'s steps: HU → 3 windows of :mod:`pe.data.windows` → resize), optionally
   passed through an in-memory JPEG round trip (:func:`pe.data.cache.jpeg_roundtrip`, default on, since
   the CNN was trained on the cached JPEGs), and the study's lung box (:class:`pe.anatomy.lungbox.LungAccumulator`,
   as the cache computes it), and when a CNN crops to the ROI (``CNNConfig.crop_mode`` roi_*) the
   per-slice ROI boxes (:class:`pe.anatomy.roi.RoiAccumulator`, the function stage 02 stores in
   rois.parquet); undecodable slices are replaced by their nearest decodable neighbour,
   as in the cache. The next studies are decoded while the models run on the current one;
2. for every fold k: the fold-k CNN(s) → slice probabilities and embeddings (rounded to float16,
   as the offline export stores them) → the fold-k sequence model(s) of every member; a ConvLSTM
   member (``model: convlstm``) reads the reduced feature maps instead, taken during the same CNN pass
   by the export's hook (:class:`pe.models.convlstm.MapCapture`) with the projection in its checkpoint;
3. per member, the folds are averaged (in the blend's probability/logit space, as
   ``src/07_ensemble.py`` averages the members' ``test_fold<k>.csv``), then the members are blended
   with ``weights.json`` of stage 07 (equal weights without one);
4. after the last study: hierarchy repair (:func:`pe.eval.hierarchy.repair_long`) and a submission
   validated against test.csv (:func:`pe.eval.submission.write_submission`).

Damaged inputs never stop the run (the headers go through :func:`pe.data.metadata.parse_metadata`,
which keeps every slice whose pixels can be read, placing slices without ImagePositionPatient by
SliceLocation / InstanceNumber): studies with no decodable slice get the training prior, test.csv
images with no usable file their study's mean image prediction, and the summary lists every image
whose prediction is such a fallback, with its reason (``fallback_images``), and the problems by kind.

Time budget: after the first ``probe`` studies, and after every study from then on, the projected
total time is compared with the budget (default 8.5 h of Kaggle's 9); when it would be exceeded,
the number of fold models per study is reduced (all → half → one) for the remaining studies rather
than timing out. (The CNN has no test-time augmentation to drop: it was not trained flip-invariant,
and left/right matter for the exam labels.)
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm import tqdm

from pe import rspect
from pe.anatomy.roi import roi_mode
from pe.eval.ensemble import EnsembleError, blend_long, equal_spec, from_space, to_space
from pe.eval.voting import VotingHead, apply_exam_pe
from pe.ids import exam_row_id
from pe.infer.budget import Budget, fold_levels
from pe.infer.localization import Student, load_student_model, localize_study, write_localization
from pe.infer.studies import StudyImages, fallback_images, iter_studies, load_study, read_study_table
from pe.rspect import EXAM_LABELS, SOP, STUDY
from pe.train.core import load_checkpoint, resolve_device

__all__ = ["InferenceConfig", "InferenceError", "ModelPlan", "StudyImages", "discover_models", "fold_levels",
           "load_study", "run_inference"]

class InferenceError(RuntimeError):
    """Models or inputs the kernel cannot use (the message names the folder or file)."""


# --- models ------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelPlan:
    """Which run folders to use: CNN experiments and sequence experiments, per fold."""

    cnn: dict[str, dict[int, Path]]  # cnn_exp -> fold -> run folder
    seq: dict[str, dict[int, Path]]  # seq_exp -> fold -> run folder
    seq_cnn: dict[str, str]  # seq_exp -> the cnn_exp whose embeddings it reads
    folds: list[int]  # folds with a CNN and every sequence member
    spec: dict[str, Any]  # weights.json of stage 07 (or equal weights)
    exam_pe_head: VotingHead | None = None  # weights.json "exam_pe_head" (07 --exam-pe-head voting)

    def describe(self) -> str:
        lines = [f"folds: {self.folds}"]
        lines += [f"CNN {e}: folds {sorted(f)}" for e, f in self.cnn.items()]
        lines += [f"sequence {e} (on {self.seq_cnn[e]}): folds {sorted(f)}" for e, f in self.seq.items()]
        lines.append(f"blend: {self.spec['mode']} averaging, "
                     + ", ".join(f"{g}: {'/'.join(f'{w:.2f}' for w in gs['weights'].values())}"
                                 for g, gs in self.spec["groups"].items()))
        if self.exam_pe_head is not None:
            h = self.exam_pe_head
            lines.append(f"exam PE head: voting on {self.spec['exam_pe_head']['cnn_exp']} (>= {h.mu} slices above "
                         f"{h.delta:.2f}: P(PE) {h.p_pe_called:.3f}, else {h.p_pe_not_called:.3f}; fitted for {h.criterion})")
        return "\n".join(lines)


def _run_folders(root: Path) -> list[Path]:
    """Run folders (``fold<k>`` with best.pt) at, under, or two levels under ``root``."""
    if (root / "best.pt").is_file():
        return [root]
    found = sorted(p.parent for p in root.glob("fold*/best.pt"))
    found += sorted(p.parent for p in root.glob("*/fold*/best.pt"))
    return found


def _fold_of(run: Path) -> int:
    m = re.fullmatch(r"fold(-?\d+)", run.name)
    if not m:
        raise InferenceError(f"{run}: a run folder must be named fold<k>")
    return int(m.group(1))


def _run_config(run: Path) -> dict[str, Any]:
    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        return yaml.safe_load(cfg_path.read_text()) or {}
    return dict(load_checkpoint(run / "best.pt", ("config",), "checkpoint")["config"])


def discover_models(models: Sequence[str | Path], weights: str | Path | None = None,
                    members: Sequence[str] | None = None) -> ModelPlan:
    """Sort run folders into CNN and sequence experiments and pair them by fold.

    ``models``: run folders (``<exp>/fold<k>``), experiment folders (``<exp>``) or a models root
    (``<root>/<exp>/fold<k>``). A run is a sequence model when its config names a ``cnn_exp``.
    ``weights``: a ``weights.json`` of stage 07 (default: one found directly in a given folder);
    its members decide which sequence experiments are used. A fold is used when the CNN of every
    needed stage-1 experiment and every member's sequence model exist for it.
    """
    runs: list[Path] = []
    for m in models:
        p = Path(m)
        if not p.exists():
            raise InferenceError(f"{p}: model folder not found")
        found = _run_folders(p)
        if not found:
            raise InferenceError(f"{p}: no run folder with best.pt found (expected <exp>/fold<k>/best.pt)")
        runs += found
        if weights is None and (p / "weights.json").is_file():
            weights = p / "weights.json"
    cnn: dict[str, dict[int, Path]] = {}
    seq: dict[str, dict[int, Path]] = {}
    seq_cnn: dict[str, str] = {}
    for run in dict.fromkeys(runs):
        cfg = _run_config(run)
        exp = str(cfg.get("name") or run.parent.name)
        if cfg.get("cnn_exp"):
            seq.setdefault(exp, {})[_fold_of(run)] = run
            seq_cnn[exp] = str(cfg["cnn_exp"])
        else:
            cnn.setdefault(exp, {})[_fold_of(run)] = run
    spec: dict[str, Any] | None = None
    if weights is not None:
        spec = json.loads(Path(weights).read_text())
        members = list(spec["members"])
    if members is None:
        members = sorted(seq)
    if not members:
        raise InferenceError(f"no sequence model found in {[str(m) for m in models]}")
    absent = [s for s in members if s not in seq]
    if absent:
        raise InferenceError(f"sequence member(s) {absent} of {weights or 'the request'} not found in the model folders")
    seq = {s: seq[s] for s in members}
    seq_cnn = {s: seq_cnn[s] for s in members}
    need_cnn = sorted(set(seq_cnn.values()))
    absent = [c for c in need_cnn if c not in cnn]
    if absent:
        raise InferenceError(f"CNN experiment(s) {absent} (read by {members}) not found in the model folders")
    cnn = {c: cnn[c] for c in need_cnn}
    head = None
    if spec is not None and spec.get("exam_pe_head") is not None:
        try:
            head = VotingHead.from_json(spec["exam_pe_head"], f"{weights}: exam_pe_head")
        except ValueError as e:
            raise InferenceError(str(e)) from e
        if spec["exam_pe_head"].get("cnn_exp") not in cnn:
            raise InferenceError(f"{weights}: the voting exam PE head reads CNN experiment "
                                 f"{spec['exam_pe_head'].get('cnn_exp')!r}, not among {sorted(cnn)}")
    fold_sets = [set(f) for f in (*cnn.values(), *seq.values())]
    folds = sorted(set.intersection(*fold_sets))
    if not folds:
        raise InferenceError("no fold has both its CNN and every sequence model: "
                             + "; ".join(f"{e}: {sorted(f)}" for e, f in {**cnn, **seq}.items()))
    return ModelPlan(cnn=cnn, seq=seq, seq_cnn=seq_cnn, folds=folds, spec=spec or equal_spec(members),
                     exam_pe_head=head)


# --- the run -----------------------------------------------------------------------------------
@dataclasses.dataclass
class InferenceConfig:
    data_dir: Path
    models: list[Path]
    out: Path
    weights: Path | None = None
    split: str = "test"
    jpeg_roundtrip: bool = True
    jpeg_quality: int = 95  # the cache's default quality (src/02_cache_images.py --quality)
    image_size: int | None = None  # default: the CNN's cache size
    budget_hours: float = 8.5
    probe_studies: int = 3  # studies before the first projection
    workers: int = 2
    prefetch: int = 0  # studies decoded ahead; 0 = workers + 1
    batch_size: int = 64
    device: str = "auto"
    raw_out: Path | None = None  # also write the blended predictions before the repair
    work_dir: Path | None = None  # where the parsed headers go (default: a temporary folder)
    progress: bool = True
    # The 3D segmentation student of stage 12 (work/localize/<exp>/student/model.pt): with it the kernel
    # also writes its predicted PE clusters per study (condrea2024), by default localization.csv next to out
    student: Path | None = None
    localization_out: Path | None = None


def cache_size_of(cnn_cfg: Any) -> int:
    """Side of the cached images the CNN was trained on: ``jpeg<N>`` in its cache_dir, else cache_size."""
    m = re.search(r"jpeg(\d+)", str(getattr(cnn_cfg, "cache_dir", "") or ""))
    return int(m.group(1)) if m else int(cnn_cfg.cache_size)


def _fallback_predictions(data_dir: Path, ids_df: pd.DataFrame) -> pd.DataFrame:
    """Prior predictions (training label means, or 0.5 without train.csv) for undecodable studies."""
    from pe.eval.baselines import prior_predictions

    train = data_dir / "train.csv"
    if train.is_file():
        return prior_predictions(pd.read_csv(train, dtype={c: object for c in rspect.ID_COLUMNS}), ids_df)
    from pe.eval.submission import expected_ids

    return pd.DataFrame({"id": expected_ids(ids_df), "label": 0.5})


@dataclasses.dataclass
class _Models:
    """Every fold's models, loaded once (the budget fallback only skips folds, it never reloads)."""

    plan: ModelPlan
    cnn: dict[tuple[str, int], Any]  # (cnn_exp, fold) -> (model, config)
    seq: dict[tuple[str, int], Any]  # (seq_exp, fold) -> (model, config)
    device: torch.device
    size: int  # input side in pixels
    quality: int | None  # JPEG round-trip quality, None = off
    student: Student | None = None  # the localisation student (pe.infer.localization), or None


def _load_models(cfg: InferenceConfig, log: Any) -> _Models:
    from pe.models.convlstm import load_convlstm_member
    from pe.models.load import load_cnn
    from pe.models.seq_rnn import load_seq_model

    plan = discover_models(cfg.models, cfg.weights)
    log(plan.describe())
    device = resolve_device(cfg.device)

    def load(loader: Any, run: Path) -> Any:
        try:
            return loader(run / "best.pt", device)
        except Exception as e:  # e.g. a checkpoint from another code version: name the file
            raise InferenceError(f"{run / 'best.pt'}: cannot load ({type(e).__name__}: {e})") from e

    cnn = {(e, k): load(load_cnn, run) for e, runs in plan.cnn.items() for k, run in runs.items() if k in plan.folds}
    seq = {(s, k): load(load_convlstm_member if _run_config(run).get("model") == "convlstm" else load_seq_model, run)
           for s, runs in plan.seq.items() for k, run in runs.items() if k in plan.folds}
    sizes = {cache_size_of(ccfg) for _, ccfg in cnn.values()}
    if cfg.image_size is None and len(sizes) != 1:
        raise InferenceError(f"the CNNs were trained on different cache sizes {sorted(sizes)}: give --image-size")
    size = cfg.image_size or sizes.pop()
    quality = cfg.jpeg_quality if cfg.jpeg_roundtrip else None
    log(f"input: {size}px 3-window slices, JPEG round trip {'q' + str(quality) if quality else 'off'}, device {device}")
    student = None
    if cfg.student is not None:
        try:
            student = load_student_model(Path(cfg.student), device, size)
        except ValueError as e:
            raise InferenceError(str(e)) from e
        log(f"localisation: student {cfg.student} (sliding window {student.cfg.crop_zyx})")
    return _Models(plan, cnn, seq, device, size, quality, student)


def _read_inputs(cfg: InferenceConfig) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """test.csv, the header table of the split's DICOMs (z order) and the parse's problems."""
    data_dir = Path(cfg.data_dir)
    ids_path = data_dir / f"{cfg.split}.csv"
    if not ids_path.is_file():
        raise InferenceError(f"{ids_path}: id table not found")
    ids_df = pd.read_csv(ids_path, dtype={c: object for c in rspect.ID_COLUMNS})
    with tempfile.TemporaryDirectory(prefix="pe_kernel_") as tmp:
        meta, problems = read_study_table(data_dir, cfg.split, Path(cfg.work_dir or tmp), cfg.workers)
    unknown = ~meta[SOP].isin(pd.Index(ids_df[SOP]))
    if unknown.any():  # parse_metadata already drops these; a guard against a stale work_dir table
        raise InferenceError(f"{data_dir / cfg.split}: {int(unknown.sum())} DICOM(s) not listed in {ids_path}, "
                             f"e.g. {meta.loc[unknown, 'path'].iloc[0]}")
    return ids_df, meta, problems


def _predict_study(models: _Models, item: StudyImages, folds: list[int], batch_size: int
                   ) -> tuple[dict[str, pd.DataFrame], dict[str, np.ndarray]]:
    """Per sequence member: the study's image and exam predictions averaged over ``folds``; and per CNN
    experiment its slice probabilities averaged over ``folds`` (read by a voting exam PE head)."""
    from pe.anatomy.roi_crop import infer_cropped
    from pe.models.convlstm import ConvLSTMMember, MapCapture, predict_study_maps
    from pe.models.seq_rnn import predict_study

    plan, mode = models.plan, models.plan.spec["mode"]
    acc = {s: [np.zeros(len(item.sops)), np.zeros(len(EXAM_LABELS)), 0] for s in plan.seq}
    cnn_probs = {e: np.zeros(len(item.sops)) for e in plan.cnn}
    for k in folds:
        for cnn_exp in plan.cnn:
            model, ccfg = models.cnn[(cnn_exp, k)]
            members = [s for s, c in plan.seq_cnn.items() if c == cnn_exp]
            # ConvLSTM members read reduced feature maps: the export's hook, with each member's projection
            conv = {s: models.seq[(s, k)][0] for s in members if isinstance(models.seq[(s, k)][0], ConvLSTMMember)}
            with MapCapture(model, {s: (m.projection, m.reduction.k) for s, m in conv.items()}) as cap:
                probs, emb = infer_cropped(model, ccfg, item.images, box=item.box, rois=item.rois,
                                           device=models.device, batch_size=batch_size,
                                           amp=models.device.type == "cuda",
                                           where=f"the kernel's ROI of study {item.study}")
            # The offline export stores embeddings (and maps) as float16 and probabilities as float32,
            # and the sequence models were trained on those: round the same way.
            emb16 = np.asarray(emb, dtype=np.float16)
            p32 = np.asarray(probs, dtype=np.float32)
            cnn_probs[cnn_exp] += p32 / len(folds)
            for s in members:
                smodel, scfg = models.seq[(s, k)]
                ip, ep = (predict_study_maps(smodel, cap.maps(s), p32) if s in conv
                          else predict_study(smodel, scfg, emb16, p32))
                acc[s][0] += to_space(ip, mode)
                acc[s][1] += to_space(ep, mode)
                acc[s][2] += 1
    exam_ids = [exam_row_id(item.study, lab) for lab in EXAM_LABELS]
    return ({s: pd.DataFrame({"id": [*item.sops, *exam_ids],
                              "label": np.clip(from_space(np.concatenate([i, e]) / n, mode), 0.0, 1.0)})
             for s, (i, e, n) in acc.items()}, cnn_probs)


@dataclasses.dataclass
class _Run:
    """What the study loop produced."""

    members: dict[str, list[pd.DataFrame]]
    cnn_probs: dict[str, np.ndarray]  # study -> fold-averaged slice probabilities of the exam PE head's CNN
    clusters: list[pd.DataFrame]  # the localisation student's clusters per study (with a student)
    folds_used: dict[str, int]
    failed: list[str]  # studies with no decodable slice
    undecodable: dict[str, str]  # SOPInstanceUID -> decode error
    budget: Budget


def _run_studies(cfg: InferenceConfig, models: _Models, meta: pd.DataFrame, log: Any, t_start: float) -> _Run:
    """Decode (worker processes) and predict every study, stepping down the fold ladder when needed."""
    roi = any(roi_mode(ccfg) is not None for _, ccfg in models.cnn.values())  # a CNN crops to the ROI
    jobs = [(study, g[SOP].tolist(), g["path"].tolist(), models.size, models.quality, roi)
            for study, g in meta.groupby(STUDY, sort=False)]
    budget = Budget(cfg.budget_hours * 3600, len(meta), fold_levels(models.plan.folds), cfg.probe_studies, t_start)
    run = _Run({s: [] for s in models.plan.seq}, {}, [], {}, [], {}, budget)
    head_cnn = (models.plan.spec["exam_pe_head"]["cnn_exp"] if models.plan.exam_pe_head is not None else None)
    bar = tqdm(total=len(jobs), desc="studies", unit="study", disable=not cfg.progress, smoothing=0.1)
    t_prev = time.perf_counter()
    for item in iter_studies(jobs, cfg.workers, cfg.prefetch or cfg.workers + 1):
        folds = budget.update(log)
        for e in item.errors[:3]:
            log(f"decode error ({item.study}): {e}")
        run.undecodable.update({item.sops[k]: e for k, e in zip(item.failed, item.errors, strict=True)})
        model_s = 0.0
        if item.images is None:
            run.failed.append(item.study)
        else:
            t_model = time.perf_counter()
            member_rows, cnn_probs = _predict_study(models, item, folds, cfg.batch_size)
            for s, rows in member_rows.items():
                run.members[s].append(rows)
            if head_cnn is not None:
                run.cnn_probs[item.study] = cnn_probs[head_cnn]
            if models.student is not None:
                run.clusters.append(localize_study(models.student, item))
            model_s = time.perf_counter() - t_model
            run.folds_used[item.study] = len(folds)
        now = time.perf_counter()
        n = len(item.sops) if item.images is not None else 0
        budget.record(n, len(folds), model_s, (now - t_prev) - model_s)
        t_prev = now
        bar.update(1)
        bar.set_postfix(folds=len(folds), slices_s=f"{budget.done_slices / (now - t_start):.1f}")
    bar.close()
    return run


def _assemble(cfg: InferenceConfig, run: _Run, plan: ModelPlan, ids_df: pd.DataFrame, meta: pd.DataFrame,
              log: Any) -> pd.DataFrame:
    """Blend the members (and apply the plan's voting exam PE head), then fill in the studies that
    failed (prior) and the test.csv images with no usable file (their study's mean image prediction)."""
    spec = plan.spec
    members = {s: pd.concat(rows, ignore_index=True) if rows else pd.DataFrame({"id": [], "label": []})
               for s, rows in run.members.items()}
    try:
        pred = blend_long(members, spec) if len(next(iter(members.values()))) else members[next(iter(members))]
    except EnsembleError as e:
        raise InferenceError(f"blending the members failed: {e}") from e
    if plan.exam_pe_head is not None and len(pred):  # the voting study head gives negative_exam_for_pe
        pred = apply_exam_pe(pred, plan.exam_pe_head.p_pe(run.cnn_probs))
    failed = sorted(set(run.failed) | (set(ids_df[STUDY]) - set(meta[STUDY])))
    if failed:
        log(f"{len(failed)} studies could not be decoded or had no DICOMs: prior predictions for them")
        pred = pd.concat([pred, _fallback_predictions(Path(cfg.data_dir), ids_df[ids_df[STUDY].isin(failed)])],
                         ignore_index=True)
    lost = ids_df[~ids_df[SOP].isin(pd.Index(pred["id"]))]
    if len(lost):
        log(f"{len(lost)} images of {cfg.split}.csv have no usable DICOM: given their study's mean image prediction")
        img = pred.set_index("id")["label"]
        study_mean = meta.assign(p=img.reindex(meta[SOP]).to_numpy()).groupby(STUDY)["p"].mean()
        pred = pd.concat([pred, pd.DataFrame({"id": lost[SOP].to_numpy(),
                                              "label": study_mean.reindex(lost[STUDY]).fillna(0.5).to_numpy()})],
                         ignore_index=True)
    return pred


def run_inference(cfg: InferenceConfig) -> dict[str, Any]:
    """Predict every study of ``cfg.split`` and write the repaired, validated submission to ``cfg.out``.

    Returns a summary: studies, slices, seconds, folds used per study, the metadata problems by kind,
    and ``fallback_images`` (every image whose prediction is a fallback, with the reason:
    :mod:`pe.infer.studies`)."""
    from pe.eval.hierarchy import RULE_IDS, check_long, repair_long, summarize_repair
    from pe.eval.submission import write_submission
    from pe.io import write_csv_atomic

    t_start = time.perf_counter()
    log = tqdm.write if cfg.progress else print
    models = _load_models(cfg, log)
    ids_df, meta, problems = _read_inputs(cfg)
    run = _run_studies(cfg, models, meta, log, t_start)
    pred = _assemble(cfg, run, models.plan, ids_df, meta, log)
    if cfg.raw_out is not None:
        write_csv_atomic(pred, cfg.raw_out)
    repaired, report = repair_long(pred, ids_df)
    n_broken = int(check_long(repaired, ids_df)[list(RULE_IDS)].to_numpy().sum())
    if n_broken:
        raise InferenceError(f"hierarchy repair left {n_broken} broken rule(s): refusing to write {cfg.out}")
    write_submission(repaired, cfg.out, ids_df)
    localization = None
    if models.student is not None:
        loc_out = Path(cfg.localization_out or Path(cfg.out).with_name("localization.csv"))
        localization = write_localization(run.clusters, loc_out, len(run.folds_used))
        log(f"wrote {loc_out}: {localization['clusters']} PE clusters in {localization['studies_with_clusters']} of "
            f"{localization['studies']} studies")
    seconds = time.perf_counter() - t_start
    failed = sorted(set(run.failed) | (set(ids_df[STUDY]) - set(meta[STUDY])))
    fallbacks = fallback_images(ids_df, meta, problems, failed, run.undecodable)
    if fallbacks:
        log(f"{len(fallbacks)} image(s) got a fallback prediction (summary: fallback_images)")
    summary = {
        "studies": int(meta[STUDY].nunique()), "slices": len(meta), "seconds": round(seconds, 2),
        "slices_per_s": round(len(meta) / seconds, 2) if seconds else None,
        "folds_available": models.plan.folds, "folds_used_per_study": run.folds_used,
        "fallback_level": run.budget.level, "decode_errors": len(run.undecodable), "failed_studies": failed,
        "problems": {str(k): int(v) for k, v in problems["problem"].value_counts().sort_index().items()},
        "fallback_images": fallbacks, "repair": summarize_repair(report), "out": str(cfg.out),
        "localization": localization,
    }
    log(f"wrote {cfg.out}: {len(repaired)} rows, {summary['studies']} studies, {len(meta)} slices in {seconds:.1f} s "
        f"({summary['slices_per_s']} slices/s); repair changed {summary['repair']['exams_changed']} exams")
    return summary
