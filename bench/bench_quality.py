"""The project's quality benchmark (``make bench-quality``): can a change be told apart from luck?

    python bench/bench_quality.py [--data-dir DIR] [--variants NAME ...] [--seeds N] [--folds K]
                                  [--first-seed S] [--out DIR] [--scale F | --train-studies N ...] [--tiny]

Protocol: the real pipeline, through the numbered scripts (subprocesses; their command lines are
the stable contracts), for the baseline and every variant (src/configs/bench/<name>.yaml) and each
seed: 03 K folds of the training part (fold seed = 42 + seed), 04 the CNN per fold, 05 its
embeddings (train: out-of-fold; test: every fold model), 06 every sequence member per fold, 07 the
blend (test predictions averaged over the fold models, as the kernel does), 08 the hierarchy repair
into a submission of the held-out studies. Figures on the held-out studies, each with a 95 %
percentile bootstrap interval over studies (pe.eval.benchmark): the competition metric, its
per-label contributions, study-level PE AUC, image AUC; baselines (prior, CNN max-aggregation),
the CNN's slice AUC alone and the Grad-CAM pointing game when the data has embolus boxes; the
seed-to-seed spread; and each variant minus the baseline, paired (same resampled studies, seed by
seed). Lower metric is better: a difference whose interval lies below 0 says the variant wins.

Data: by default the benchmark phantom (stage 00, made once in input/bench-phantom and reused);
its test split is the held-out set (its truth is phantom_test_labels.csv). ``--data-dir DIR``: any
RSPECT-layout folder; held out is its test split when ``--test-truth`` (or phantom_test_labels.csv)
labels it, else a seeded stratified share (``--holdout``) of train/, through a derived folder of
symlinks. Stage 01/02 outputs are cached per data fingerprint under ``--work-root``.
Default size (--scale F multiplies the study counts; --train-studies etc. set them): 180 training +
60 held-out studies of 30-60 slices at 512 px, 50 % PE-positive exams, emboli shrunk to 0.6 of the
phantom's usual defect radius and run of slices (``--embolus-scale``), K = 2 folds. Why: 60 held-out
studies give ~30 PE exams, so every exam label has held-out positives (chronic ~4, acute-and-chronic
~2, central ~5, indeterminate 1) and the study-level AUCs are defined; RSPECT's 32 % would leave 1
acute-and-chronic exam and fewer positive slices for the CNN. The phantom's ordinary emboli made the
CNN's max-aggregation reach study PE AUC 0.998 (run of 2026-11-27, 3 folds): no method could show a
study-level gain on it; at 0.6 the smallest (segmental) defects fall below the CNN's resolution and
the CNN's out-of-fold slice AUC drops to ~0.85, as on real data, where the study-level call has room
to improve. K = 2 (each fold trains on 90 studies, ~2,300 samples per epoch, 6 epochs ~430 steps)
halves the CNN cost of K = 3 to fit the default run (baseline + a stage-2 variant, 2 seeds: 4 CNN
folds) in the issue's 45 minutes on this 2-core machine; the README has the measured stage times.
A variant that changes the CNN adds about half of the run again. A CNN a variant builds on (``cnn.before``,
e.g. dual_hop's hop 1) with the recipe and seed of a CNN this run has trained already is copied, not retrained.
Output in ``--out`` (default reports/bench-quality/<date-time>/): results.json, the printed table
(table.txt), index.html + labels.png, predictions/<variant>_seed<s>.csv (id,label), logs/, runs/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pe import paths  # noqa: E402
from pe.eval import benchmark as bm  # noqa: E402
from pe.eval.benchmark_report import evaluate, write_outputs  # noqa: E402
from pe.eval.data_signature import image_signature  # noqa: E402

REPO = paths.REPO_ROOT
PY = sys.executable
WORKERS = str(min(8, os.cpu_count() or 1))  # processes of stages 00-02
# Sizes: (train studies, test studies, min slices, max slices, px, positive rate). Default: see --help.
DEFAULT = dict(train_studies=180, test_studies=60, min_slices=30, max_slices=60, size=512, positive_rate=0.5,
               embolus_scale=0.6)
TINY = dict(train_studies=12, test_studies=6, min_slices=8, max_slices=12, size=128, positive_rate=0.6,
            embolus_scale=1.0)
TINY_CNN = ["epochs=1", "img_size=64", "batch_size=16", "threads=1"]
TINY_SEQ = ["epochs=2", "hidden=16", "attn_dim=8"]
# Relative cost of each stage kind, for the progress bar's time-left estimate (measured shares).
COST = {"00": 12.0, "01": 1.0, "02": 2.0, "03": 0.2, "04": 20.0, "13": 6.0, "05": 4.0, "06": 0.8, "07": 0.3, "08": 0.3,
        "explain": 1.0}


@dataclass
class Stage:
    name: str
    cmd: list[str]
    env: dict[str, str] | None
    kind: str
    done: Path | None = None  # marker: the stage is skipped when it exists (reused data stages)
    # (source run folder, its fold folder, this run folder, fold folder): copied instead of running cmd
    copy: tuple[Path, Path, Path, Path] | None = None
    after: str | None = None  # another run folder whose output this stage reads: reruns when that one did


def _copy_fold(src_run: Path, src: Path, run: Path, dst: Path, log: TextIO) -> int:
    """Copy a fold's model folder ``src`` of run folder ``src_run`` to ``dst`` of ``run``, after checking
    that both run folders split the studies into the same folds (a copied model must not have seen the
    validation studies of the fold it stands for)."""
    folds = [r / "work" / "folds.csv" for r in (src_run, run)]
    if not all(f.is_file() for f in folds) or folds[0].read_bytes() != folds[1].read_bytes():
        print(f"{folds[0]} and {folds[1]}: missing or not the same folds; not copying {src}", file=log)
        return 1
    if not (src / "best.pt").is_file():
        print(f"{src / 'best.pt'}: not found", file=log)
        return 1
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    print(f"copied {src} to {dst}", file=log)
    return 0


def _call_script(st: Stage, log: TextIO) -> int:
    """A stage's ``main(argv)`` in this process, under its environment (``--in-process``: saves the
    interpreter and torch start-up per stage, seconds each, for the tiny test run)."""
    spec = importlib.util.spec_from_file_location(Path(st.cmd[1]).stem, REPO / st.cmd[1])
    assert spec is not None and spec.loader is not None, st.cmd[1]
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    keys = [k for k in (st.env or {}) if k.startswith("PE_")]
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: st.env[k] for k in keys})  # type: ignore[index]
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return int(mod.main(st.cmd[2:]) or 0)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def config_fingerprints(cmd: Sequence[str]) -> dict[str, str]:
    """SHA-256 (short) of every YAML file a stage command names: a resumed run must redo a stage
    whose config file changed even when its command line did not."""
    out = {}
    for a in cmd:
        if str(a).endswith((".yaml", ".yml")) and (REPO / a).is_file():
            out[str(a)] = bm.fingerprint_text((REPO / a).read_text())
    return out


def _by_content(cmd: Sequence[str], configs: dict[str, str]) -> list[str]:
    """The command with every config file named by its contents' fingerprint instead of its path."""
    return [configs.get(str(a), str(a)) if str(a).endswith((".yaml", ".yml")) else str(a) for a in cmd]


def _same_key(done: Path, key: dict) -> bool:
    """Whether a run stage's marker records this command and these config contents. Config files count by
    their bytes, not their paths: a byte-identical copy at another path (the benchmark's frozen CNN recipe,
    src/configs/bench_cnn_base.yaml) resumes the runs made with the original."""
    try:
        old = json.loads(done.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(old.get("cmd"), list) or not isinstance(old.get("configs"), dict):
        return False
    return (_by_content(old["cmd"], old["configs"]) == _by_content(key["cmd"], key["configs"])
            and old.get("data") == key["data"])


class Runner:
    """Runs stages as subprocesses with a weighted progress bar; records each wall time."""

    def __init__(self, log_dir: Path, total: float, quiet: bool, in_process: bool = False) -> None:
        from tqdm import tqdm

        self.in_process = in_process
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}
        self.rerun: set[str] = set()  # run folders in which a stage ran again: later stages rerun too
        self.data_key = ""  # fingerprint of the data (labels + image listing): part of every marker's key
        self.bar = tqdm(total=round(total, 1), desc="bench-quality", unit="cost", disable=quiet,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}] {postfix}")

    def advance(self, cost: float) -> None:
        """Move the bar, never past its total (tqdm drops a total that ``n`` exceeds, and the bar
        format's ``{total:.0f}`` then fails: an estimate must not stop a benchmark)."""
        self.bar.update(max(0.0, min(cost, self.bar.total - self.bar.n)))

    def run(self, st: Stage) -> None:
        self.bar.set_postfix_str(st.name)
        safe = st.name.replace("/", "_").replace(":", "_")
        # data stages mark their shared folder; run stages mark the --out folder with their exact
        # command, so a rerun into the same --out resumes after the last finished stage
        done = st.done or self.log_dir / f"{safe}.done"
        key = {"cmd": st.cmd, "configs": config_fingerprints(st.cmd), "data": self.data_key}
        run = st.name.split("/")[0] if "/" in st.name else None
        if (done.exists() and run not in self.rerun and st.after not in self.rerun
                and (st.done is not None or _same_key(done, key))):
            self.seconds[st.name] = 0.0
            self.advance(COST[st.kind])
            return
        if run is not None:  # everything after a rerun stage of this run folder reads its new outputs
            self.rerun.add(run)
        log = self.log_dir / (safe + ".log")
        t0 = time.perf_counter()
        with open(log, "w") as f:
            if st.copy is not None:
                rc = _copy_fold(*st.copy, f)
            elif self.in_process:
                rc = _call_script(st, f)
            else:
                rc = subprocess.run(st.cmd, cwd=REPO, env=st.env, stdout=f, stderr=subprocess.STDOUT).returncode
        self.seconds[st.name] = round(time.perf_counter() - t0, 2)
        if rc != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            raise RuntimeError(f"stage {st.name} failed (exit {rc}); {log}:\n{tail}")
        done.write_text(json.dumps({"seconds": self.seconds[st.name], **key}))
        self.advance(COST[st.kind])

    def timed(self, name: str, kind: str, fn, *args, **kwargs):  # noqa: ANN001, ANN201
        self.bar.set_postfix_str(name)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        self.advance(COST[kind])
        return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, help="RSPECT-layout folder (default: the benchmark phantom)")
    ap.add_argument("--test-truth", type=Path, help="train.csv-format labels of DIR/test (else hold out)")
    ap.add_argument("--holdout", type=float, default=0.25, help="held-out share of train/ when needed")
    ap.add_argument("--variants", nargs="*", default=[], help="names in src/configs/bench/ besides baseline")
    ap.add_argument("--seeds", type=int, default=2, help="seeds S..S+N-1 of every variant (paired)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="S: the first seed (fresh seeds to confirm a result seen with seeds 0..N-1)")
    ap.add_argument("--folds", type=int, default=2, help="K folds of the training part")
    ap.add_argument("--out", type=Path, help="output folder (default reports/bench-quality/<date-time>)")
    ap.add_argument("--work-root", type=Path, default=REPO / "work" / "bench-quality",
                    help="cache of stage 01/02 outputs per data fingerprint")
    ap.add_argument("--phantom-dir", type=Path, default=REPO / "input" / "bench-phantom")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the phantom's study counts")
    for k, v in DEFAULT.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, help=f"phantom (default {v})")
    ap.add_argument("--tiny", action="store_true", help="seconds-scale run for tests (tiny phantom and models)")
    ap.add_argument("--cnn-override", nargs="*", default=[], help="key=value added to every variant's CNN")
    ap.add_argument("--seq-override", nargs="*", default=[], help="key=value added to every sequence member")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--max-pointing", type=int, default=128, help="boxed positive slices for the pointing game")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--in-process", action="store_true",
                    help="call each script's main() in this process instead of a subprocess (tests)")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.folds < 2 or args.first_seed < 0:
        ap.error("need --seeds >= 1, --folds >= 2 and --first-seed >= 0")
    sizes = dict(TINY if args.tiny else DEFAULT)
    sizes["train_studies"] = max(4, round(sizes["train_studies"] * args.scale))
    sizes["test_studies"] = max(2, round(sizes["test_studies"] * args.scale))
    for k in DEFAULT:
        if getattr(args, k) is not None:
            sizes[k] = getattr(args, k)
    args.sizes = sizes
    if args.tiny:
        args.cnn_override = [*TINY_CNN, *args.cnn_override]
        args.seq_override = [*TINY_SEQ, *args.seq_override]
        args.n_boot = min(args.n_boot, 200)
        args.max_pointing = min(args.max_pointing, 16)
    args.out = args.out or REPO / "reports" / "bench-quality" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return args


def phantom_stage(args: argparse.Namespace) -> Stage:
    """Stage 00 for the benchmark phantom, skipped when the folder already holds one of these sizes."""
    s = args.sizes
    out = args.phantom_dir
    cmd = [PY, "src/00_make_phantom.py", "--out", str(out), "--train-studies", str(s["train_studies"]),
           "--test-studies", str(s["test_studies"]), "--seed", "2024", "--size", str(s["size"]),
           "--min-slices", str(s["min_slices"]), "--max-slices", str(s["max_slices"]),
           "--positive-rate", str(s["positive_rate"]), "--embolus-scale", str(s["embolus_scale"]),
           "--workers", WORKERS]
    key = bm.fingerprint_text(" ".join(cmd[3:-2]))  # same bytes whatever --workers
    return Stage("00_make_phantom", cmd, None, "00", done=out / f".bench-{key}")


def data_view(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """(data folder the stages read, held-out truth file, mode) once the data exists."""
    data = args.data_dir or args.phantom_dir
    truth = args.test_truth or (data / "phantom_test_labels.csv")
    if truth.is_file() and (data / "test.csv").is_file():
        return data, truth, "test split"
    if args.test_truth:
        raise bm.BenchError(f"{args.test_truth}: test truth file or {data / 'test.csv'} not found")
    fp = bm.fingerprint([data / "train.csv"])
    view = args.work_root / f"holdout-{fp}-{args.holdout}"
    view, truth = bm.make_holdout_view(data, view / "data", args.holdout, seed=0)
    return view, truth, f"hold-out {args.holdout:.0%} of train/ (seed 0)"


def prep_stages(data: Path, prep: Path, cache_sizes: Sequence[int]) -> list[Stage]:
    out = []
    env = bm.env_for(prep, prep / "oof", data, prep / "reports")
    for split in ("train", "test"):
        meta = prep / "meta" / f"{split}.parquet"
        out.append(Stage(f"01_parse_metadata:{split}", [PY, "src/01_parse_metadata.py", "--data-dir", str(data),
                                                         "--split", split, "--out", str(meta), "--workers", WORKERS],
                         env, "01", done=prep / f".done-01-{split}"))
    for size in cache_sizes:
        for split in ("train", "test"):
            out.append(Stage(f"02_cache_images:{split}:{size}",
                             [PY, "src/02_cache_images.py", "--meta", str(prep / "meta" / f"{split}.parquet"),
                              "--out", str(prep / "cache" / f"jpeg{size}"), "--size", str(size), "--workers", WORKERS],
                             env, "02", done=prep / f".done-02-{split}-{size}-roi"))  # "-roi": with rois.parquet
    return out


def cnn_overrides(spec: bm.StageSpec, args: argparse.Namespace, seed: int, name: str) -> list[str]:
    """The ``key=value`` arguments of a stage-04 training of ``spec`` named ``name`` at run seed ``seed``."""
    return [*spec.overrides, *args.cnn_override, f"name={name}", f"seed={bm.config_seed(spec) + seed}", "progress=false"]


def cnn_recipe(spec: bm.StageSpec, args: argparse.Namespace, seed: int) -> str:
    """What a stage-04 training of ``spec`` at run seed ``seed`` depends on besides its experiment name:
    the config's bytes and its arguments but the name (its run folder's folds are made the same way in
    every run folder of a seed, and checked when a model is copied)."""
    over = [o for o in cnn_overrides(spec, args, seed, "") if not o.startswith("name=")]
    return bm.fingerprint_text("\n".join([(REPO / spec.config).read_text(), *over]))


def cnn_stages(v: bm.Variant, args: argparse.Namespace, seed: int, run: Path, env: dict[str, str],
               maps: bool = False, fit_export: bool = False, trained: dict[str, Path] | None = None) -> list[Stage]:
    """Stages 03-05 of one run folder. ``trained``: CNN recipe -> the run folder whose main CNN ("cnn")
    was trained with it; a stage-04 run the variant builds on (hop 1 of a dual-hop model) with the same
    recipe is copied from there instead of trained again (the same recipe and seed train the same model)."""
    cnn_over = cnn_overrides(v.cnn, args, seed, "cnn")
    st = [Stage(f"{run.name}/03_make_folds", [PY, "src/03_make_folds.py", "--meta", str(run / "work/meta/train.parquet"),
                                              "--out", str(run / "work/folds.csv"), "--n-folds", str(args.folds),
                                              "--seed", str(42 + seed)], env, "03")]
    for b in v.before:  # runs the CNN builds on (hop 1 of a dual-hop model, landmark pretraining)
        over = cnn_overrides(b.spec, args, seed, b.name)
        src = trained.get(cnn_recipe(b.spec, args, seed)) if trained and b.script == "04" else None
        if b.script == "13":
            st.append(Stage(f"{run.name}/13_pretrain_landmarks:{b.name}",
                            [PY, bm.PRE_SCRIPTS["13"], "--config", b.spec.config, *over], env, "13"))
        elif src is not None:
            for k in range(args.folds):
                fold_src, fold_dst = src / "work/models/cnn" / f"fold{k}", run / "work/models" / b.name / f"fold{k}"
                st.append(Stage(f"{run.name}/04_reuse_cnn:{b.name}:fold{k}", ["copy", str(fold_src), str(fold_dst)],
                                env, "03", copy=(src, fold_src, run, fold_dst), after=src.name))
        else:
            st += [Stage(f"{run.name}/04_train_cnn:{b.name}:fold{k}",
                         [PY, bm.PRE_SCRIPTS["04"], "--config", b.spec.config, "--fold", str(k), *over], env, "04")
                   for k in range(args.folds)]
    st += [Stage(f"{run.name}/04_train_cnn:fold{k}", [PY, "src/04_train_cnn.py", "--config", v.cnn.config, "--fold",
                                                      str(k), *cnn_over], env, "04") for k in range(args.folds)]
    # --maps (reduced feature maps) only when a member of the group is a ConvLSTM: the command, and so
    # the resume marker, of the other groups stays as it was
    st += [Stage(f"{run.name}/05_export_embeddings:{s}", [PY, "src/05_export_embeddings.py", "--exp", "cnn",
                                                          "--split", s, *(["--maps"] if maps else [])], env, "05")
           for s in ("train", "test")]
    if fit_export:  # each fold's CNN on its own training studies (train_embeddings: fold_model)
        st.append(Stage(f"{run.name}/05_export_embeddings:train_fit",
                        [PY, "src/05_export_embeddings.py", "--exp", "cnn", "--split", "train_fit",
                         *(["--maps"] if maps else [])], env, "05"))
    return st


def seq_stages(v: bm.Variant, args: argparse.Namespace, seed: int, run: Path, env: dict[str, str],
               data: Path, pred_csv: Path) -> list[Stage]:
    st, members = [], []
    for i, m in enumerate(v.seq):
        name = f"{v.name}_m{i}"
        members.append(name)
        over = [*m.overrides, *args.seq_override, f"name={name}", "cnn_exp=cnn", f"seed={bm.config_seed(m) + seed}",
                "progress=false"]
        st += [Stage(f"{run.name}/06_train_sequence:{name}:fold{k}",
                     [PY, "src/06_train_sequence.py", "--config", m.config, "--fold", str(k), "--no-summary", *over],
                     env, "06") for k in range(args.folds)]
    st.append(Stage(f"{run.name}/07_ensemble:{v.name}", [PY, "src/07_ensemble.py", "--members", *members,
                                                         "--out", f"ens_{v.name}", "--cnn-exp", "cnn",
                                                         *(["--exam-pe-head", v.exam_pe_head]
                                                           if v.exam_pe_head != "sequence" else [])], env, "07"))
    st.append(Stage(f"{run.name}/08_make_submission:{v.name}",
                    [PY, "src/08_make_submission.py", "--pred", str(run / "oof" / f"ens_{v.name}" / "test.csv"),
                     "--test", str(data / "test.csv"), "--out", str(pred_csv)], env, "08"))
    return st


def link_run(run: Path, prep: Path) -> None:
    """A run's work folder sees the shared metadata and caches through symlinks (its own folds/models)."""
    (run / "work").mkdir(parents=True, exist_ok=True)
    for name in ("meta", "cache"):
        link = run / "work" / name
        if not link.exists():
            link.symlink_to((prep / name).resolve(), target_is_directory=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    variants = [bm.load_variant("baseline")] + [bm.load_variant(n) for n in args.variants if n != "baseline"]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions").mkdir(exist_ok=True)
    cnn_groups: dict[str, list[bm.Variant]] = {}
    for v in variants:
        cnn_groups.setdefault(v.cnn_key(args.cnn_override), []).append(v)
    # the progress bar's total: every stage this run may run (pre-stages and extra exports included)
    cnn_cost = sum(COST["explain"] + sum(COST[s.kind] for s in cnn_stages(
        g[0], args, 0, Path("run"), {}, bm.needs_maps(g, args.seq_override), bm.needs_fit_export(g, args.seq_override)))
        for g in cnn_groups.values())
    total = (COST["00"] * (args.data_dir is None) + 2 * COST["01"] + 2 * COST["02"] + len(seeds) * cnn_cost
             + len(seeds) * sum(len(v.seq) * args.folds * COST["06"] + COST["07"] + COST["08"] for v in variants))
    runner = Runner(out / "logs", total, args.quiet, args.in_process)
    if args.data_dir is None:
        runner.run(phantom_stage(args))
    data, truth_file, mode = data_view(args)
    # labels and the images' listing: a folder with the same labels but other images (the shortcut
    # phantom) gets its own prepared data, and its runs' resume markers do not match another folder's
    fp = bm.fingerprint([data / "train.csv", data / "test.csv", truth_file]) + "-" + image_signature(data)
    prep = args.work_root / f"prep-{fp}"
    runner.data_key = fp
    cache_sizes = sorted({bm.cache_size(v.cnn, args.cnn_override) for v in variants})
    for st in prep_stages(data, prep, cache_sizes):
        runner.run(st)
    runs: dict[tuple[str, int], Path] = {}
    trained: dict[str, Path] = {}  # CNN recipe -> the run folder that trained it as its main CNN
    for key, group in cnn_groups.items():
        for seed in seeds:
            run = out / "runs" / f"cnn-{key}-s{seed}"
            link_run(run, prep)
            env = bm.env_for(run / "work", run / "oof", data, run / "reports")
            for st in cnn_stages(group[0], args, seed, run, env, bm.needs_maps(group, args.seq_override),
                                 bm.needs_fit_export(group, args.seq_override), trained):
                runner.run(st)
            if not group[0].before:  # a CNN built on other runs is not its recipe's plain model
                trained.setdefault(cnn_recipe(group[0].cnn, args, seed), run)
            for v in group:
                runs[(v.name, seed)] = run
                for st in seq_stages(v, args, seed, run, env, data, out / "predictions" / f"{v.name}_seed{seed}.csv"):
                    runner.run(st)
    results = evaluate(args, variants, seeds, runs, data, truth_file, runner)
    runner.bar.close()
    results.update(run=out.name, mode=mode, data_dir=str(data), data_fingerprint=fp, prep_dir=str(prep),
                   command=[Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
                   machine=f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
                   date=dt.datetime.now().isoformat(timespec="seconds"), folds=args.folds, seeds=seeds,
                   sizes=args.sizes if args.data_dir is None else None, n_boot=args.n_boot,
                   cnn_override=args.cnn_override, seq_override=args.seq_override,
                   stage_seconds=runner.seconds, wall_seconds=round(time.perf_counter() - t_start, 1))
    table = write_outputs(results, out)
    print(table)
    print(f"wall time {results['wall_seconds']:.0f} s; results in {out}/results.json, page {out}/index.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
