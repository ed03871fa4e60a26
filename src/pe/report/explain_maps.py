"""The report's explanation maps: each chosen slice explained by the fold model that did not train
on it (Grad-CAM, optionally integrated gradients), the pointing game against the embolus boxes and
the occlusion check."""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch
from tqdm import tqdm

from pe import paths
from pe.anatomy.roi import roi_mode
from pe.anatomy.roi_crop import roi_lookup, study_inputs
from pe.config import resolve_paths
from pe.data.cache import load_boxes, load_index, load_study_images
from pe.explain.cam import cam_module, grad_cam, logit_of
from pe.explain.ig import integrated_gradients
from pe.explain.pointing import boxes_to_input_frame, fill_boxes, pointing_game
from pe.models.load import load_cnn
from pe.report.evaluation import Evaluation, ExplainedSlice  # noqa: E402
from pe.report.html import html_table, img  # noqa: E402
from pe.report.inputs import cnn_oof_folds, load_embolus_boxes, original_shapes, study_folds  # noqa: E402
from pe.report.plots import plot_maps  # noqa: E402
from pe.rspect import SOP, STUDY  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Explanation maps (stage-1 CNN)
# ------------------------------------------------------------------------------------------------
def explain_slices(cnn_exp: str, targets: pd.DataFrame, fold_of: pd.Series,
                   boxes: pd.DataFrame | None, shapes: pd.DataFrame | None, ig: bool = False,
                   ig_steps: int = 32, device: str = "cpu", batch_size: int = 16,
                   cam_layer: str | None = None, weights: str = "model") -> list[ExplainedSlice]:
    """Grad-CAM (and optionally integrated gradients) for ``targets`` (columns SOPInstanceUID,
    StudyInstanceUID, prob). Each study is explained by the model of its own validation fold
    (``work/models/<cnn_exp>/fold<k>/best.pt``), so no map comes from a model that saw the study.
    ``cam_layer``: dotted name of the module whose output Grad-CAM uses (default the model's
    ``gradcam_layer``, the last feature map; an earlier block gives finer but less semantic maps).
    ``weights``: the checkpoint's weights to explain (``"model"``, or ``"train_model"``: see
    :func:`pe.models.load.load_cnn`)."""
    dev = torch.device(device)
    out: list[ExplainedSlice] = []
    targets = targets.assign(fold=targets[STUDY].map(fold_of)).dropna(subset=["fold"])
    by_box = None if boxes is None else {k: g[["x", "y", "width", "height"]].to_numpy(float)
                                         for k, g in boxes.groupby(SOP)}
    for fold, tf in sorted(targets.groupby("fold"), key=lambda kv: kv[0]):
        fold = int(fold)
        ckpt = paths.run_dir(cnn_exp, fold) / "best.pt"
        if not ckpt.is_file():
            log.warning("%s not found: fold %d slices not explained", ckpt, fold)
            continue
        try:
            model, cfg = load_cnn(ckpt, dev, weights)
        except Exception as e:  # name the file: torch's messages do not
            raise RuntimeError(f"{ckpt}: cannot load the CNN checkpoint: {type(e).__name__}: {e}") from e
        model.eval()
        layer = cam_module(model, cam_layer, ckpt)
        cache_dir = resolve_paths(cfg)[0]
        cindex = load_index(cache_dir)
        crop_boxes = {}
        if getattr(cfg, "crop_lung", False) and roi_mode(cfg) is None:
            crop_boxes = {str(r[STUDY]): (int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"]))
                          for r in load_boxes(cache_dir).to_dict("records")}
        rois = roi_lookup(cache_dir) if roi_mode(cfg) is not None else {}
        centre = 3 * int(getattr(cfg, "neighbors", 0)) + 1  # G (PE window) of the centre slice
        for study, ts in tqdm(tf.groupby(STUDY), desc=f"explain {cnn_exp}/fold{fold}", leave=False,
                              disable=None):  # None: no bar when stderr is not a terminal (logs)
            study = str(study)
            ci = cindex[cindex[STUDY] == study].sort_values("slice_index")
            pos = pd.Series(np.arange(len(ci)), index=ci[SOP].astype(str).to_numpy())
            rows = pos.reindex(ts[SOP].astype(str)).to_numpy()
            if np.isnan(rows.astype(float)).any():
                raise ValueError(f"{cache_dir}/index.parquet: some slices of study {study} are not cached")
            images = load_study_images(cache_dir, study, cindex)
            # As the CNN was trained (lung box or per-centre ROI crops), and per row the crop its input
            # was really cut from (clip_box may round it or drop a tiny box).
            x, crops = study_inputs(images, cfg, [int(r) for r in rows], crop_boxes.get(study), rois.get(study),
                                    where=f"{cache_dir / 'rois.parquet'} (study {study})")
            x = x.float().to(dev)
            cams = np.concatenate([grad_cam(model, xb, layer) for xb in x.split(batch_size)])
            igs = (np.concatenate([integrated_gradients(model, xb, steps=ig_steps) for xb in x.split(batch_size)])
                   if ig else None)
            h, w = x.shape[-2:]
            frame_boxes: list[np.ndarray | None] = []
            for r, crop in zip(ts.itertuples(index=False), crops, strict=True):
                sop = str(getattr(r, SOP))
                b = None
                if by_box is not None and shapes is not None and sop in by_box and sop in shapes.index:
                    rc = (int(shapes.at[sop, "rows"]), int(shapes.at[sop, "columns"]))
                    b = boxes_to_input_frame(by_box[sop], rc, images.shape[1], crop, (int(h), int(w)))
                frame_boxes.append(b)
            drops: list[float | None] = [None] * len(frame_boxes)
            if any(b is not None and len(b) for b in frame_boxes):
                with torch.no_grad():
                    delta = (logit_of(model(x)) - logit_of(model(fill_boxes(x, frame_boxes)))).cpu().numpy()
                drops = [float(d) if b is not None and len(b) else None for d, b in zip(delta, frame_boxes, strict=True)]
            for j, r in enumerate(ts.itertuples(index=False)):
                out.append(ExplainedSlice(sop=str(getattr(r, SOP)), study=study, fold=fold, prob=float(r.prob),
                                          image=x[j, centre].cpu().numpy(), cam=cams[j],
                                          ig=None if igs is None else igs[j], boxes=frame_boxes[j],
                                          logit_drop=drops[j]))
    return out


log = logging.getLogger(__name__)


def pointing_results(slices: Sequence[ExplainedSlice]) -> dict[str, Any]:
    """The pointing game of each map kind over the slices that have boxes in the input frame."""

    boxed = [s for s in slices if s.boxes is not None and len(s.boxes)]
    out: dict[str, Any] = {}
    for name, attr in (("Grad-CAM", "cam"), ("integrated gradients", "ig")):
        use = [s for s in boxed if getattr(s, attr) is not None]
        if use:
            out[name] = pointing_game([getattr(s, attr) for s in use], [s.boxes for s in use])
    return out


def select_explained(ev: Evaluation, cnn_probs: pd.Series | None, boxes: pd.DataFrame | None,
                     fold_of: pd.Series, n_cams: int, max_pointing: int, seed: int = 0) -> tuple[pd.DataFrame, set[str], set[str]]:
    """Slices to explain: the ``n_cams`` true-positive slices with the highest CNN probability (for
    display) and up to ``max_pointing`` randomly drawn positive slices with embolus boxes (for the
    pointing game), restricted to studies with a validation fold. Returns (targets, display SOPs,
    pointing SOPs)."""
    s = ev.scorer
    study = s.study_ids[s.image_study].astype(str)
    df = pd.DataFrame({SOP: s.image_ids.astype(str), STUDY: study, "truth": s.image_truth,
                       "final_prob": ev.image_probs})
    df["prob"] = df["final_prob"] if cnn_probs is None else cnn_probs.reindex(df[SOP]).to_numpy()
    df["prob"] = df["prob"].fillna(df["final_prob"])
    pos = df[(df["truth"] > 0.5) & df[STUDY].isin(fold_of.index)]
    display = set(pos.sort_values("prob", ascending=False, kind="stable")[SOP].head(n_cams))
    pointing: set[str] = set()
    if boxes is not None:
        boxed = pos[pos[SOP].isin(set(boxes[SOP].astype(str)))]
        if len(boxed) > max_pointing:
            boxed = boxed.sample(n=max_pointing, random_state=seed)
        pointing = set(boxed[SOP])
    targets = pos[pos[SOP].isin(display | pointing)][[SOP, STUDY, "prob"]]
    return targets.reset_index(drop=True), display, pointing


def explanation_section(ev: Evaluation, cnn_exp: str, cnn_probs: pd.Series | None, out: Path, summary: dict[str, Any],
                  n_cams: int, ig: bool, ig_steps: int, max_pointing: int, device: str,
                  cam_layer: str | None = None) -> str:
    notes: list[str] = summary["notes"]
    # The CNN's own OOF files say which fold model did not see a study; folds.csv is the fallback.
    fold_of = cnn_oof_folds(cnn_exp)
    if fold_of is None:
        fold_of = study_folds()
    if fold_of is None:
        notes.append(f"no oof/{cnn_exp}/cnn_fold<k>.parquet and no {paths.folds_path()}: explanation maps skipped")
        return "<p>no folds: skipped</p>"
    if not any((paths.run_dir(cnn_exp, k) / "best.pt").is_file() for k in sorted(set(fold_of))):
        notes.append(f"no {paths.models_dir() / cnn_exp}/fold<k>/best.pt: explanation maps skipped")
        return "<p>no CNN checkpoints: skipped</p>"
    boxes = load_embolus_boxes()
    shapes = original_shapes() if boxes is not None else None
    if boxes is not None and shapes is None:
        notes.append(f"{paths.meta_path('train')} not found: embolus boxes cannot be scaled, no pointing game")
        boxes = None
    targets, display, pointing = select_explained(ev, cnn_probs, boxes, fold_of, n_cams, max_pointing)
    if targets.empty:
        notes.append("no positive slice in a study with a validation fold: explanation maps skipped")
        return "<p>no positive slices: skipped</p>"
    slices = explain_slices(cnn_exp, targets, fold_of, boxes, shapes, ig=ig, ig_steps=ig_steps, device=device,
                            cam_layer=cam_layer)
    summary["cam_layer"] = cam_layer or "gradcam_layer (last feature map)"
    shown = sorted((x for x in slices if x.sop in display), key=lambda x: -x.prob)
    parts = []
    if shown:
        plot_maps(shown, out / "maps.png")
        parts.append("<p class='note'>Most confident true-positive slices (stage-1 CNN probability), each "
                     "explained by the fold model that did not train on it. Grad-CAM (shi2020 eqs. 1–2) on "
                     f"<code>{html.escape(summary['cam_layer'])}</code>, over the PE-window channel of the centre slice; green: true embolus boxes; white cross: map "
                     "peak.</p>" + img("maps.png", "explanation maps"))
    results = pointing_results([x for x in slices if x.sop in pointing])
    summary["pointing_game"] = {k: vars(r) for k, r in results.items()}
    if results:
        for name, r in results.items():
            print(r.summary(name))
        parts.append("<p class='note'>Pointing game: a map hits when its peak pixel lies inside a true "
                     "embolus box (boxes mapped to the model input frame through the cache resize, the lung "
                     "crop and the input resize). Chance = mean share of the slice the boxes cover.</p>"
                     + html_table(["map", "slices", "hits", "accuracy", "chance rate", "accuracy / chance"],
                                  [[k, r.n, r.hits, r.accuracy, r.chance,
                                    r.accuracy / r.chance if r.chance > 0 else float("nan")]
                                   for k, r in results.items()], table_id="pointing-table", digits=4))
        drops = np.array([x.logit_drop for x in slices if x.sop in pointing and x.logit_drop is not None])
        if len(drops):
            occ = {"n": int(len(drops)), "mean_logit_drop": float(drops.mean()),
                   "share_dropping": float((drops > 0).mean())}
            summary["occlusion"] = occ
            print(f"emboli filled in: PE logit drops by {occ['mean_logit_drop']:+.3f} on average, "
                  f"on {occ['share_dropping']:.0%} of {occ['n']} slices")
            parts.append("<p class='note'>Occlusion check: each embolus box painted over with the "
                         "surrounding artery's contrast (90th percentile of the box grown by 3 px). A model "
                         "that detects the emboli themselves loses PE logit; one that relies on context "
                         "does not, and then no explanation map can point at the emboli.</p>"
                         + html_table(["slices", "mean PE-logit drop", "share of slices whose logit drops"],
                                      [[occ["n"], occ["mean_logit_drop"], occ["share_dropping"]]],
                                      table_id="occlusion-table", digits=4))
    elif boxes is None:
        parts.append("<p class='note'>No embolus boxes in the data (train_boxes.csv): no pointing game.</p>")
    return "\n".join(parts)
