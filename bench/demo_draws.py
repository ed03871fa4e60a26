"""The demo CNN over several phantom draws (issue 14): one trial's figures, and two recipes compared
paired over draws. Trials are the folders of ``bench/demo_cnn_trial.sh`` (work/demo-trials/NAME).

  # what demo_cnn_trial.sh runs after stage 04: keeps the phantom's slice truth in the trial folder
  # (truth.csv) and prints the slice counts, the wall times and the AUC by embolus box size
  python bench/demo_draws.py record work/demo-trials/NAME --data work/demo-trials/NAME/data --seconds 33 20 420

  # trials made before the script kept truth.csv: remake seed N's demo phantom once (~35 s, then
  # deleted) and write its truth into each trial of that draw. Only for trials of the plain demo phantom
  # (no TRAIN / MINS / MAXS / POS / SCALE): a trial of another draw is refused (its slice ids differ), but
  # one of the same seed with other phantom options may share the ids and not the labels
  python bench/demo_draws.py truth --seed 1 work/demo-trials/seed1 work/demo-trials/lightaug_seed1

  # recipe B against recipe A, paired by draw (the i-th trial of --a with the i-th of --b, same seed)
  python bench/demo_draws.py compare --a shipped seed1 shipped_seed2 --b lightaug_seed0 lightaug_seed1 lightaug_seed2

``compare`` prints each draw's pooled out-of-fold slice AUC on both sides, each side's mean (sd) and
how many draws reach --target, and B − A: mean, 95 % t-interval over draws and a two-sided sign test.
A bare trial name is looked up in --trials-dir (default work/demo-trials).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from pe.eval import draws  # noqa: E402
from pe.io import write_csv_atomic  # noqa: E402


def _box_line(fig: dict) -> str:
    parts = [f"{k} px2: {a:.3f} (n={n})" for k, (a, n) in fig["by_box"].items()]
    if fig["positives_without_box"]:
        parts.append(f"{fig['positives_without_box']} positives without a box left out")
    return "; ".join(parts)


def record(trial: Path, data: Path, seconds: list[int]) -> None:
    truth = draws.slice_truth(data)
    write_csv_atomic(truth, trial / "truth.csv")
    fig = draws.trial_figures(draws.trial_oof(trial, truth))
    t_ph, t_prep, t_cnn = seconds
    print(f"{trial.name}: {fig['slices']} out-of-fold slices ({fig['positives']} positive); "
          f"phantom {t_ph} s, stages 01-03 {t_prep} s, CNN {t_cnn} s")
    print(f"{trial.name}: slice AUC of the positives by largest embolus box vs all negatives: {_box_line(fig)}")


def backfill_truth(seed: int, trials: list[Path]) -> None:
    with tempfile.TemporaryDirectory(prefix="demo-draw-") as tmp:
        cmd = [sys.executable, str(REPO / "src" / "00_make_phantom.py"), "--out", f"{tmp}/data",
               "--seed", str(seed), "--preset", "demo"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        truth = draws.slice_truth(f"{tmp}/data")
    for t in trials:
        draws.trial_oof(t, truth)  # refuses a trial of another draw before writing anything
        write_csv_atomic(truth, t / "truth.csv")
        print(f"{t}: truth of the demo phantom seed {seed} written ({len(truth)} slices)")


def compare(a: list[Path], b: list[Path], target: float) -> dict:
    if len(a) != len(b):
        raise SystemExit(f"--a has {len(a)} trials and --b {len(b)}: pair them draw by draw")
    fa = [draws.trial_figures(draws.trial_oof(t)) for t in a]
    fb = [draws.trial_figures(draws.trial_oof(t)) for t in b]
    print(f"{'A':<22} {'pooled':>7}   {'B':<22} {'pooled':>7}   B - A")
    for ta, x, tb, y in zip(a, fa, b, fb, strict=True):
        if x["slices"] != y["slices"]:
            raise SystemExit(f"{ta} and {tb} have {x['slices']} and {y['slices']} out-of-fold slices: not one draw")
        print(f"{ta.name:<22} {x['pooled_auc']:7.4f}   {tb.name:<22} {y['pooled_auc']:7.4f}   "
              f"{y['pooled_auc'] - x['pooled_auc']:+.4f}")
    res = draws.paired_over_draws([x["pooled_auc"] for x in fa], [y["pooled_auc"] for y in fb])
    for side, figs in (("A", fa), ("B", fb)):
        v = [f["pooled_auc"] for f in figs]
        print(f"{side}: mean {statistics.mean(v):.4f} (sd {statistics.stdev(v):.4f}) over {len(v)} draws; "
              f"{sum(x >= target for x in v)} reach {target:.2f}")
    lo, hi = res["ci"]
    print(f"B - A: {res['mean']:+.4f}, 95 % t-interval over draws [{lo:+.4f}, {hi:+.4f}]; B higher on "
          f"{res['wins']} of {res['n']} draws (lower on {res['losses']}), sign test p = {res['sign_p']:.3f}")
    return res


def _trial(name: str, trials_dir: Path) -> Path:
    p = Path(name)
    return p if p.is_dir() or "/" in name else trials_dir / name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="keep the trial's truth and print its figures")
    r.add_argument("trial", type=Path)
    r.add_argument("--data", type=Path, required=True, help="the trial's phantom (RSPECT layout with boxes)")
    r.add_argument("--seconds", type=int, nargs=3, required=True, metavar=("PHANTOM", "PREP", "CNN"))
    t = sub.add_parser("truth", help="write seed N's demo-phantom truth into trials made without it")
    t.add_argument("--seed", type=int, required=True)
    t.add_argument("trials", type=Path, nargs="+")
    c = sub.add_parser("compare", help="recipe B against recipe A, paired by draw")
    c.add_argument("--a", nargs="+", required=True)
    c.add_argument("--b", nargs="+", required=True)
    c.add_argument("--target", type=float, default=0.90, help="pooled AUC a draw should reach (issue 14: 0.90)")
    c.add_argument("--trials-dir", type=Path, default=REPO / "work" / "demo-trials")
    args = ap.parse_args(argv)
    if args.cmd == "record":
        record(args.trial, args.data, args.seconds)
    elif args.cmd == "truth":
        backfill_truth(args.seed, args.trials)
    else:
        compare([_trial(n, args.trials_dir) for n in args.a], [_trial(n, args.trials_dir) for n in args.b],
                args.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
