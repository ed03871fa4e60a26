"""Paired comparisons ACROSS quality-benchmark output folders (``bench/compare_runs.py``).

One benchmark run pairs variants on one data folder. Some questions need two folders that share
their held-out studies: shi2020's shortcut ablation trains the same recipes on the ordinary benchmark
phantom and on its shortcut twin (``00_make_phantom.py --shortcut-rate``: same studies, a marker
planted in the training split only) and asks how much each recipe DROPS on the unmarked held-out
split. Here every named side is a (benchmark ``--out`` folder, variant) pair; the figures of each
side are recomputed from its run folder exactly as the benchmark does (stage 07's predictions before
the repair for the ranking figures, the repaired set for the metric, the fold-averaged CNN slice
probabilities for the slice AUC), and contrasts are linear combinations of sides, paired per seed
on ONE bootstrap resample of the held-out studies:

    shortcut-plain - ordinary-plain                                    (the plain CNN's drop)
    shortcut-attention - ordinary-attention - shortcut-plain + ordinary-plain   (drop gap)

Both folders must hold predictions for exactly the truth file's images, or the comparison is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pe.data.tables import read_truth
from pe.eval import benchmark as bm
from pe.eval import metric, submission
from pe.eval.benchmark_report import fmt_ci, heldout_cnn_probs, scored_and_ranked
from pe.rspect import SOP, STUDY

KEYS: tuple[str, ...] = ("score", "study_pe_auc", "image_auc", "cnn_slice_auc")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TERM = re.compile(r"([+-])\s*([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class Side:
    """One benchmark output folder's variant: its runs are ``out/runs/cnn-<key>-s<seed>``."""

    name: str
    out: Path
    variant: str


def parse_side(text: str) -> Side:
    """``NAME=OUT_DIR:VARIANT`` (the variant defaults to baseline)."""
    name, sep, rest = text.partition("=")
    if not sep or not _NAME.match(name):
        raise bm.BenchError(f"side {text!r}: expected NAME=OUT_DIR[:VARIANT], NAME a plain identifier")
    out, _, variant = rest.rpartition(":") if ":" in rest else (rest, "", "baseline")
    return Side(name, Path(out), variant or "baseline")


def parse_contrast(text: str, names: Sequence[str]) -> list[tuple[int, str]]:
    """``a-b`` or ``a-b-c+d``: signed sides (a leading name is +)."""
    s = text.replace(" ", "")
    s = s if s.startswith(("+", "-")) else "+" + s
    terms = [(1 if m.group(1) == "+" else -1, m.group(2)) for m in _TERM.finditer(s)]
    if "".join(f"{'+' if k > 0 else '-'}{n}" for k, n in terms) != s or not terms:
        raise bm.BenchError(f"contrast {text!r}: expected names joined by + and -, e.g. a-b or a-b-c+d")
    unknown = [n for _, n in terms if n not in names]
    if unknown:
        raise bm.BenchError(f"contrast {text!r}: unknown side(s) {unknown}; sides are {list(names)}")
    return terms


def run_folder(side: Side, seed: int, cnn_override: Sequence[str] = ()) -> Path:
    """The run folder of ``side.variant`` for ``seed``: the only ``runs/cnn-*-s<seed>`` holding that
    variant's predictions, or, when several do (the variant's CNN config changed between runs), the
    one the benchmark would use now (same key rule, ``cnn_override`` as given to it)."""
    found = sorted(side.out.glob(f"runs/cnn-*-s{seed}/oof/ens_{side.variant}/test.csv"))
    if len(found) == 1:
        return found[0].parents[2]
    want = side.out / "runs" / f"cnn-{bm.load_variant(side.variant).cnn_key(cnn_override)}-s{seed}"
    if want / "oof" / f"ens_{side.variant}" / "test.csv" in found:
        return want
    where = [str(f.parents[2].name) for f in found] or "none"
    raise bm.BenchError(f"{side.name}: no unambiguous run of variant {side.variant!r} seed {seed} in "
                        f"{side.out / 'runs'} (candidates: {where}); run `bench/bench_quality.py --out {side.out} "
                        f"--variants {side.variant}` for that seed, or pass the --cnn-override it ran with")


def side_stats(side: Side, scorer: metric.Scorer, ids: pd.DataFrame, seeds: Sequence[int],
               cnn_override: Sequence[str] = ()) -> dict[str, list[bm.Stat]]:
    """Per seed, the benchmark's statistics of one side (functions of the studies' weights);
    ``ids``: the truth's (study, image) rows, which the hierarchy repair needs."""
    out: dict[str, list[bm.Stat]] = {k: [] for k in KEYS}
    for seed in seeds:
        run = run_folder(side, seed, cnn_override)
        raw_file = run / "oof" / f"ens_{side.variant}" / "test.csv"
        raw = submission.read_submission(raw_file)
        missing = set(scorer.all_ids) - set(raw["id"])
        extra = set(raw["id"]) - set(scorer.all_ids)
        if missing or extra:
            raise bm.BenchError(f"{raw_file}: not the truth file's held-out set ({len(missing)} ids missing, "
                                f"{len(extra)} not in the truth), e.g. {sorted(missing or extra)[:2]}")
        parts = scored_and_ranked(scorer, raw, None, ids)  # the repair 08_make_submission applies
        _, probs = heldout_cnn_probs(run, scorer)
        for k in KEYS[:3]:
            out[k].append(bm.figure_stat(parts, k))
        out["cnn_slice_auc"].append(bm.slice_auc_stat(scorer.image_study, scorer.image_truth, probs))
    return out


def _combination(terms: Sequence[tuple[int, list[bm.Stat]]]) -> bm.Stat:
    """Mean over seeds of the signed sum of the sides' per-seed statistics (seeds paired)."""
    n_seeds = {len(s) for _, s in terms}
    if len(n_seeds) != 1:
        raise ValueError(f"contrast sides have different seed counts: {sorted(n_seeds)}")
    n = n_seeds.pop()
    return lambda w: float(np.mean([sum(k * s[i](w) for k, s in terms) for i in range(n)]))


def compare(truth_file: Path, sides: Sequence[Side], contrasts: Sequence[str], seeds: Sequence[int],
            n_boot: int = 1000, cnn_override: Sequence[str] = ()) -> dict[str, Any]:
    """Each side's mean-over-seeds figures and each contrast's, with 95 % bootstrap intervals over the
    held-out studies (one shared resample per bootstrap draw: every side and seed is paired)."""
    names = [s.name for s in sides]
    if len(set(names)) != len(names):
        raise bm.BenchError(f"side names must differ, got {names}")
    parsed = {c: parse_contrast(c, names) for c in contrasts}
    truth = read_truth(truth_file)
    scorer = metric.Scorer(truth)
    stats = {s.name: side_stats(s, scorer, truth[[STUDY, SOP]], seeds, cnn_override) for s in sides}
    n = scorer.n_studies
    res: dict[str, Any] = {"truth": str(truth_file), "seeds": list(seeds), "n_heldout_studies": n,
                           "sides": {s.name: {"out": str(s.out), "variant": s.variant} for s in sides},
                           "figures": {}, "contrasts": {}}
    for s in sides:
        res["figures"][s.name] = {k: bm.ci(n, bm.mean_over(stats[s.name][k]), n_boot, seed=0) for k in KEYS}
    for c, terms in parsed.items():
        res["contrasts"][c] = {k: bm.ci(n, _combination([(sign, stats[name][k]) for sign, name in terms]), n_boot,
                                        seed=0) for k in KEYS}
    return res


def format_comparison(r: Mapping[str, Any]) -> str:
    """The printed table: sides, then contrasts, each figure with its interval."""
    w = max(12, *(len(x) for x in [*r["figures"], *r["contrasts"]])) + 2
    head = f"{'':{w}}" + "".join(f"{k:28}" for k in KEYS)
    lines = [f"held-out: {r['n_heldout_studies']} studies ({r['truth']}); seeds {r['seeds']} (paired); "
             "95 % bootstrap intervals over studies; metric: lower is better", "", head]
    for name, figs in r["figures"].items():
        side = r["sides"][name]
        lines.append(f"{name:{w}}" + "".join(f"{fmt_ci(figs[k]):28}" for k in KEYS)
                     + f"  ({side['out']} : {side['variant']})")
    lines += ["", "contrasts (paired on the same resampled studies and seeds):"]
    for c, figs in r["contrasts"].items():
        lines.append(f"{c:{w}}" + "".join(f"{fmt_ci(figs[k]):28}" for k in KEYS))
    return "\n".join(lines)
