"""The paper's localisation metrics on data with box truth (condrea2024 Sec. IV, Tables II-V).

Every study the stage wrote is scored against its true emboli (boxes → 3D emboli in the cache frame,
:func:`pe.localize.frames.truth_labels`) with the Pu et al. cluster matching of
:func:`pe.localize.clusters.match_clusters`; pooled sensitivity / PPV / F1 come with percentile
bootstrap intervals over studies (:func:`pe.localize.clusters.pooled_scores`). Studies without an
embolus count too: each cluster predicted there is a false positive.

Rows of :func:`localization_table`: the teacher after refinement round k (filtered; Table II), the
teacher's final masks without and with the filter (Table III), and the student (Tables IV-V), each
with its mean seconds per study. Below them, :func:`paired_rows`: differences between rows (the paper's
teacher findings, student against teacher) with a paired bootstrap over the studies both scored.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from pe.localize.clusters import (
    filter_clusters,
    label_clusters,
    match_clusters,
    paired_difference,
    per_study_table,
    pooled_scores,
)
from pe.localize.frames import Truth
from pe.localize.pseudo_io import PseudoMaskStore
from pe.localize.teacher_stage import TeacherStageConfig
from pe.rspect import STUDY

TABLE_COLUMNS = ["method", "studies", "emboli", "clusters", "sensitivity", "ppv", "f1", "seconds_per_study"]


def score_volumes(studies: list[str], predict: Callable[[str], np.ndarray], truth: Truth) -> pd.DataFrame:
    """Per-study TP/FP/FN table of the label volumes ``predict(study)``."""
    counts = []
    for s in studies:
        pred = predict(s)
        counts.append((s, match_clusters(pred, truth.labels(s, pred.shape))))
    return per_study_table(counts)


def _row(method: str, table: pd.DataFrame, seconds: float, n_boot: int, seed: int) -> dict:
    """A table row; ``table`` (the per-study counts) is kept for the paired comparisons."""
    ci = pooled_scores(table, n_boot=n_boot, seed=seed)
    return {"method": method, "studies": len(table), "emboli": int(table["n_true"].sum()),
            "clusters": int(table["n_pred"].sum()), "sensitivity": ci["sensitivity"], "ppv": ci["ppv"],
            "f1": ci["f1"], "seconds_per_study": seconds, "table": table}


def _seconds(root: Path) -> float:
    t = root / "timings.csv"
    return float(pd.read_csv(t)["seconds"].mean()) if t.is_file() else float("nan")


def teacher_rows(root: Path, truth: Truth, flt_cfg: TeacherStageConfig, n_boot: int = 1000,
                 seed: int = 0) -> list[dict]:
    """Table II (filtered masks after each refinement round) and III (final, unfiltered / filtered)."""
    iters = PseudoMaskStore(root / "iters")
    studies = sorted(iters.done() & PseudoMaskStore(root / "masks").done())
    if not studies:
        return []
    maps = {s: iters.read(s)[0] for s in studies}
    rounds = max(int(m.max(initial=0)) for m in maps.values())
    secs = _seconds(root)

    def at(k: int, filtered: bool) -> Callable[[str], np.ndarray]:
        def f(s: str) -> np.ndarray:
            m = maps[s]
            lab = label_clusters((m > 0) & (m <= k))
            return filter_clusters(lab, flt_cfg.cluster_filter(m.shape[2])) if filtered else lab
        return f

    rows = [_row(f"teacher, round <= {k}, filtered", score_volumes(studies, at(k, True), truth), secs, n_boot, seed)
            for k in range(1, rounds + 1)]
    final = max(rounds, 1)
    rows.append(_row("teacher, final, unfiltered", score_volumes(studies, at(final, False), truth), secs, n_boot, seed))
    rows.append(_row("teacher, final, filtered", score_volumes(studies, at(final, True), truth), secs, n_boot, seed))
    return rows


SCORE_ROW = ", score >= "  # rows of a student's clusters above a score: an operating-point sweep, not compared


def store_rows(method: str, root: Path, truth: Truth, n_boot: int = 1000, seed: int = 0,
               min_scores: tuple[float, ...] = ()) -> list[dict]:
    """One row for a folder with ``masks/`` (the student's, or any stage's final clusters), and one per
    ``min_scores`` value keeping only the clusters whose ``score_max`` (``clusters.csv``: the student's
    highest PE probability in the cluster) reaches it: the student's operating point swept."""
    store = PseudoMaskStore(root / "masks")
    studies = sorted(store.done())
    if not studies:
        return []
    table = score_volumes(studies, lambda s: store.read(s)[0], truth)
    rows = [_row(method, table, _seconds(root), n_boot, seed)]
    if min_scores:
        if not (root / "clusters.csv").is_file():
            raise FileNotFoundError(f"{root / 'clusters.csv'}: no cluster scores to sweep (rerun stage 12 there)")
        clusters = pd.read_csv(root / "clusters.csv", dtype={STUDY: str})
    for t in min_scores:
        kept = clusters[clusters["score_max"] >= t].groupby(STUDY)["cluster"].apply(set).to_dict()

        def above(s: str, kept: dict = kept) -> np.ndarray:
            lab = store.read(s)[0]
            return np.where(np.isin(lab, sorted(kept.get(s, ()))), lab, 0)

        rows.append(_row(f"{method}{SCORE_ROW}{t:g}", score_volumes(studies, above, truth), _seconds(root), n_boot, seed))
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table (estimates with 95 % bootstrap intervals)."""
    head = f"{'method':<34} {'studies':>7} {'emboli':>6} {'clusters':>8}  {'sensitivity':<21} {'PPV':<21} {'F1':<21} {'s/study':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<34} {r['studies']:>7} {r['emboli']:>6} {r['clusters']:>8}  {str(r['sensitivity']):<21} "
                     f"{str(r['ppv']):<21} {str(r['f1']):<21} {r['seconds_per_study']:>7.2f}")
    return "\n".join(lines)


def localization_table(exp: str, split: str, boxes_csv: str | Path, flt_cfg: TeacherStageConfig | None = None,
                       n_boot: int = 1000, seed: int = 0, students: dict[str, str | Path] | None = None,
                       teacher_out: str | Path | None = None, min_scores: tuple[float, ...] = ()) -> list[dict]:
    """Teacher rows (Tables II-III) and student rows (IV-V) of ``exp`` on ``split``. ``students`` maps a
    row name to a stage-12 output folder (default ``{"student": work/localize/<exp>/student}``);
    ``teacher_out`` is a stage-11 output folder of ``split`` (default work/localize/<exp>/teacher/<split>);
    ``min_scores`` adds each student's rows above those cluster scores (:func:`store_rows`)."""
    from pe.localize.student_stage import student_dir
    from pe.localize.teacher_stage import teacher_dir

    truth = Truth.for_split(split, boxes_csv)
    teacher = Path(teacher_out) if teacher_out is not None else teacher_dir(exp, split)
    rows = teacher_rows(teacher, truth, flt_cfg or TeacherStageConfig(), n_boot, seed)
    for name, root in (students or {"student": student_dir(exp)}).items():
        rows += store_rows(name, Path(root) / split, truth, n_boot, seed, tuple(min_scores))
    if not rows:
        raise FileNotFoundError(f"no teacher or student output of {exp} on {split} (run src/11_pseudo_masks.py)")
    return rows


TEACHER_FINAL = "teacher, final, filtered"


def comparisons(rows: list[dict], focus: str | None = None) -> list[tuple[str, str]]:
    """The (b, a) pairs to report as b - a: the paper's teacher findings (a second refinement round,
    the size/distance filter), each student against the final filtered teacher, and later students
    against the first one, or with ``focus`` (a student's row name) that student against every other."""
    names = [r["method"] for r in rows]
    pairs = [("teacher, round <= 2, filtered", "teacher, round <= 1, filtered"),
             (TEACHER_FINAL, "teacher, final, unfiltered")]
    students = [n for n in names if not n.startswith("teacher") and SCORE_ROW not in n]
    pairs += [(s, TEACHER_FINAL) for s in students]
    if focus is None:
        pairs += [(s, students[0]) for s in students[1:]]
    elif focus in students:
        pairs += [(focus, s) for s in students if s != focus]
    else:
        raise ValueError(f"no student row {focus!r} to compare with the others (rows: {', '.join(students)})")
    return [(b, a) for b, a in pairs if b in names and a in names]


def paired_rows(rows: list[dict], n_boot: int = 1000, seed: int = 0, focus: str | None = None) -> list[dict]:
    """Paired differences b - a of sensitivity / PPV / F1 over the studies both rows scored
    (:func:`pe.localize.clusters.paired_difference`), for the pairs of :func:`comparisons`."""
    by = {r["method"]: r for r in rows}
    return [_pair_row(by, b, a, n_boot, seed) for b, a in comparisons(rows, focus)]


def _pair_row(by: dict[str, dict], b: str, a: str, n_boot: int, seed: int) -> dict:
    """Row ``b - a`` of the paired differences (rows looked up by name in ``by``)."""
    ci = paired_difference(by[a]["table"], by[b]["table"], n_boot=n_boot, seed=seed)
    common = len(set(by[a]["table"][STUDY]) & set(by[b]["table"][STUDY]))
    return {"method": f"{b}  -  {a}", "studies": common, **ci}


def group_rows(rows: list[dict], groups: dict[str, list[str]], n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Each later group of student rows against the first (e.g. one recipe at seeds 0-3 against another at
    the same seeds): member by member (b_i - a_i, when the groups are the same size: matched seeds) and the
    mean over each group's pooled scores (the expected score of one run), paired over the studies every
    member scored (:func:`pe.localize.clusters.paired_difference` of the two lists)."""
    by = {r["method"]: r for r in rows}
    if len(groups) < 2:
        raise ValueError(f"give at least two groups to compare, got {len(groups)}")
    for name, members in groups.items():
        if missing := [m for m in members if m not in by]:
            raise ValueError(f"group {name!r}: no row named {', '.join(missing)} (rows: {', '.join(by)})")
        if not members:
            raise ValueError(f"group {name!r} has no rows")
    (first, ref), *later = groups.items()
    out = []
    for name, members in later:
        if len(members) == len(ref):
            out += [_pair_row(by, b, a, n_boot, seed) for b, a in zip(members, ref, strict=True)]
        tables_a, tables_b = [by[m]["table"] for m in ref], [by[m]["table"] for m in members]
        ci = paired_difference(tables_a, tables_b, n_boot=n_boot, seed=seed)
        common = set.intersection(*(set(t[STUDY]) for t in tables_a + tables_b))
        out.append({"method": f"mean of {name} ({len(members)})  -  mean of {first} ({len(ref)})",
                    "studies": len(common), **ci})
    return out


def format_paired(pairs: list[dict]) -> str:
    """The paired differences as a text table; 'excl. 0' marks an F1 interval that excludes 0."""
    head = f"{'difference (b - a, paired over studies)':<72} {'studies':>7}  {'sensitivity':<24} {'PPV':<24} {'F1':<24}"
    lines = [head, "-" * len(head)]
    for r in pairs:
        f1 = r["f1"]
        mark = "  excl. 0" if f1.low > 0 or f1.high < 0 else ""
        lines.append(f"{r['method']:<72} {r['studies']:>7}  {_signed(r['sensitivity']):<24} {_signed(r['ppv']):<24} "
                     f"{_signed(f1):<24}{mark}")
    return "\n".join(lines)


def _signed(ci) -> str:
    return f"{ci.estimate:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}]"


def format_report(rows: list[dict], n_boot: int = 1000, seed: int = 0, focus: str | None = None) -> str:
    """The table and, where it has pairs to compare, the paired differences below it."""
    pairs = paired_rows(rows, n_boot, seed, focus)
    return format_table(rows) + ("\n\n" + format_paired(pairs) if pairs else "")


def rows_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows (of the table or of :func:`paired_rows`) with the intervals split into estimate / low / high
    columns (for CSV/JSON)."""
    out = []
    for r in rows:
        d = {k: r.get(k) for k in ("method", "studies", "emboli", "clusters", "seconds_per_study")}
        for m in ("sensitivity", "ppv", "f1"):
            d[m], d[f"{m}_low"], d[f"{m}_high"] = r[m].estimate, r[m].low, r[m].high
        out.append(d)
    return pd.DataFrame(out)

