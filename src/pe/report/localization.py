"""Report section of the weakly supervised localisation (condrea2024; stages 11 and 12): for a few
studies with embolus boxes, the slice with the most embolus area side by side with the truth boxes,
the teacher's pseudo-mask and the student's prediction, all in the cache frame the masks live in.

Reads work/localize/<cnn_exp>/{teacher,student}/<split>/masks (pe.localize.pseudo_io), the CNN's
JPEG cache (its config) and the truth boxes of the split (train_boxes.csv / phantom_test_boxes.csv)
with the original sizes of work/meta/<split>.parquet. Absent stage-11 output: no section.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pe import paths  # noqa: E402
from pe.data.cache import load_index, read_jpeg  # noqa: E402
from pe.report.html import html_table, img  # noqa: E402
from pe.report.plots import save_figure  # noqa: E402
from pe.rspect import SOP, STUDY  # noqa: E402

BOX_FILES = {"train": "train_boxes.csv", "test": "phantom_test_boxes.csv"}


def _stores(cnn_exp: str) -> tuple[str, Any, Any] | None:
    """(split, teacher store, student store or None) of the first split with teacher masks."""
    from pe.localize.pseudo_io import PseudoMaskStore
    from pe.localize.student_stage import student_dir
    from pe.localize.teacher_stage import teacher_dir

    found = None
    for split in ("test", "train"):
        t = PseudoMaskStore(teacher_dir(cnn_exp, split) / "masks")
        if not t.parts.is_dir() or not t.done():
            continue
        s = PseudoMaskStore(student_dir(cnn_exp) / split / "masks")
        s = s if s.parts.is_dir() and s.done() else None
        if found is None or (s is not None and found[2] is None):
            found = (split, t, s)
    return found


def choose_slices(boxes: pd.DataFrame, index: pd.DataFrame, studies: set[str], n: int) -> list[tuple[str, int, str]]:
    """Up to ``n`` (study, slice_index, SOP): in the studies with the most boxed slices, the slice
    whose boxes cover the largest area."""
    b = boxes.merge(index[[STUDY, SOP, "slice_index"]], on=SOP, how="inner")
    b = b[b[STUDY].isin(studies)]
    if b.empty:
        return []
    b = b.assign(area=b["width"] * b["height"])
    per_slice = b.groupby([STUDY, SOP, "slice_index"], as_index=False)["area"].sum()
    n_slices = per_slice.groupby(STUDY)[SOP].count().sort_values(ascending=False, kind="stable")
    out = []
    for study in n_slices.index[:n]:
        row = per_slice[per_slice[STUDY] == study].sort_values("area", ascending=False, kind="stable").iloc[0]
        out.append((str(study), int(row["slice_index"]), str(row[SOP])))
    return out


def _draw(ax: Any, image: np.ndarray, mask: np.ndarray | None, boxes: np.ndarray, title: str) -> None:
    ax.imshow(image[..., 1], cmap="gray")  # the PE window
    if mask is not None and mask.any():
        ax.imshow(np.ma.masked_where(mask == 0, mask), cmap="autumn", alpha=0.55, interpolation="nearest")
    for x0, y0, w, h in boxes:
        ax.add_patch(plt.Rectangle((x0, y0), w, h, fill=False, edgecolor="lime", linewidth=1.2))
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def localization_section(cnn_exp: str | None, out: Path, summary: dict[str, Any], n: int = 3) -> str | None:
    """HTML (and ``out/localization.png``) of the side-by-side panels, or None without stage-11 output."""
    if not cnn_exp:
        return None
    found = _stores(cnn_exp)
    if found is None:
        return None
    split, teacher, student = found
    box_file = paths.data_dir() / BOX_FILES[split]
    meta_file = paths.meta_path(split)
    if not box_file.is_file() or not meta_file.is_file():
        return f"<p>teacher pseudo-masks found ({split}) but no {html.escape(box_file.name)} or metadata to compare with</p>"
    from pe.config import resolve_paths
    from pe.localize.teacher_stage import any_checkpoint
    from pe.models.load import load_cnn

    cache = resolve_paths(load_cnn(any_checkpoint(cnn_exp), "cpu")[1])[0]
    index = load_index(cache)
    boxes = pd.read_csv(box_file, dtype={SOP: str})
    shapes = pd.read_parquet(meta_file, columns=[SOP, "rows", "columns"]).drop_duplicates(SOP).set_index(SOP)
    chosen = choose_slices(boxes, index, set(teacher.done()), n)
    if not chosen:
        return f"<p>no {split} study has both teacher pseudo-masks and embolus boxes</p>"
    fig, axes = plt.subplots(len(chosen), 3, figsize=(9, 3 * len(chosen)), squeeze=False)
    rows = []
    for r, (study, k, sop) in enumerate(chosen):
        file = index.loc[(index[STUDY] == study) & (index["slice_index"] == k), "file"].iloc[0]
        image = read_jpeg(cache / file)
        size = image.shape[0]
        rc = shapes.loc[sop]
        sb = boxes.loc[boxes[SOP] == sop, ["x", "y", "width", "height"]].to_numpy(np.float64)
        sb = sb * np.array([size / rc["columns"], size / rc["rows"]] * 2)
        t_mask = teacher.read(study)[0][k]
        s_mask = student.read(study)[0][k] if student is not None and study in student.done() else None
        _draw(axes[r, 0], image, None, sb, f"{study} slice {k}: truth boxes")
        _draw(axes[r, 1], image, t_mask, sb, f"teacher pseudo-mask ({int((t_mask > 0).sum())} px)")
        _draw(axes[r, 2], image, s_mask, sb, "student prediction" + ("" if s_mask is not None else ": none")
              + ("" if s_mask is None else f" ({int((s_mask > 0).sum())} px)"))
        inside = np.zeros((size, size), bool)
        for x0, y0, w, h in sb:
            inside[int(y0):int(np.ceil(y0 + h)), int(x0):int(np.ceil(x0 + w))] = True
        rows.append([study, k, len(sb), int((t_mask > 0).sum()), int(((t_mask > 0) & inside).sum()),
                     "n/a" if s_mask is None else int((s_mask > 0).sum()),
                     "n/a" if s_mask is None else int(((s_mask > 0) & inside).sum())])
    save_figure(fig, out / "localization.png")
    summary["localization"] = {"split": split, "slices": rows}
    return ("<p class='note'>Stage 11 (teacher: integrated gradients, hysteresis, iterative masking) and stage "
            f"12 (3D student) on {html.escape(split)} studies; green: truth embolus boxes; orange: mask pixels "
            "(cache frame).</p>" + img("localization.png", "truth, teacher and student side by side")
            + html_table(["study", "slice", "boxes", "teacher px", "teacher px in boxes", "student px",
                          "student px in boxes"], rows, table_id="localization-table"))
