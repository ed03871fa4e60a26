"""Build the Kaggle upload folders for the offline inference notebook (``make kaggle-dataset``).

    python kernels/make_kaggle_dataset.py [--user NAME] [--models EXP ...] [--ensemble NAME] [--folds 0 1 ...]

Writes, under kernels/build/ (git-ignored; rebuilt from scratch on every run):
- ``rsna-pe-src/``: a copy of the repository's ``src/`` (package ``pe``, numbered scripts, configs)
  and ``kernels/rsna-pe-inference/inference.py``, with ``dataset-metadata.json``;
- ``rsna-pe-models/`` (only with ``--models`` or ``--ensemble``): ``<exp>/fold<k>/{best.pt,config.yaml}``
  of the chosen experiments (from ``work/models/``, i.e. ``$PE_WORK_DIR/models``) and the ensemble's
  ``weights.json`` (from ``oof/<NAME>/``), with ``dataset-metadata.json``;
- ``rsna-pe-wheels/`` (skip with ``--no-wheels``): ``pip download`` of the pinned runtime packages the
  kernel needs and the Kaggle image may lack (:data:`RUNTIME_PACKAGES`: pydicom, GDCM, pylibjpeg and
  its plugins, timm, albumentations) and of their dependencies, torch/torchvision excluded, as wheels
  for the target ``--python-version`` / ``--platform``, with the manifest ``pe_wheels.json`` that the
  notebook's first step (``install_wheels.py``) reads, and ``dataset-metadata.json``;
- ``rsna-pe-inference/``: the notebook and ``kernel-metadata.json`` with ``--user`` filled in.

Wheels target: by default Python 3.11 on x86_64 Linux with glibc 2.35 (Kaggle's GPU notebook image
is built on Ubuntu 22.04 with Python 3.11; if ``python --version`` in a Kaggle notebook says
otherwise, pass ``--python-version``). A ``manylinux_2_N`` platform also accepts every older glibc tag.
Versions: the top-level packages at their pins in requirements.txt, their dependencies at the
versions installed in the environment running this script (the project's pinned .venv).

Upload with the Kaggle CLI: ``kaggle datasets create -p kernels/build/rsna-pe-src`` (then
``kaggle datasets version -p ... -m msg`` for updates), the same for ``rsna-pe-models``, then
``kaggle kernels push -p kernels/build/rsna-pe-inference``. Nothing is copied by hand between
``src/`` and ``kernels/``: this script is the only bridge.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parent
REPO = KERNELS.parent
# This script lives outside src/ and is run as a file (Makefile: make kaggle-dataset), so the
# package is put on the path here, as in the kernel itself; everything else imports pe normally.
sys.path.insert(0, str(REPO / "src"))

from pe import paths  # noqa: E402
from pe.io import write_json_atomic, write_text_atomic  # noqa: E402

KERNEL_DIR = KERNELS / "rsna-pe-inference"
CODE_SLUG = "rsna-pe-src"
MODELS_SLUG = "rsna-pe-models"
WHEELS_SLUG = "rsna-pe-wheels"
KAGGLE_PYTHON = "3.11"
KAGGLE_PLATFORM = "manylinux_2_35_x86_64"
# distribution -> import name: what the kernel needs beyond torch/torchvision and the image's basics
RUNTIME_PACKAGES: dict[str, str] = {
    "pydicom": "pydicom", "python-gdcm": "gdcm", "pylibjpeg": "pylibjpeg", "pylibjpeg-libjpeg": "libjpeg",
    "pylibjpeg-openjpeg": "openjpeg", "pylibjpeg-rle": "rle", "timm": "timm", "albumentations": "albumentations",
}
EXCLUDED = frozenset({"torch", "torchvision"})  # on the GPU image, built for its CUDA; never replaced
PLACEHOLDER_USER = "YOUR_KAGGLE_USERNAME"
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


def dataset_metadata(user: str, slug: str, title: str, license_name: str) -> dict[str, object]:
    """Kaggle CLI ``dataset-metadata.json``: title, id ``<user>/<slug>``, licenses."""
    return {"title": title, "id": f"{user}/{slug}", "licenses": [{"name": license_name}]}


def build_code(out: Path, user: str, license_name: str) -> Path:
    dest = out / CODE_SLUG
    shutil.copytree(REPO / "src", dest / "src", ignore=_IGNORE)
    (dest / "kernels" / KERNEL_DIR.name).mkdir(parents=True)
    for name in ("inference.py", "install_wheels.py"):
        shutil.copy2(KERNEL_DIR / name, dest / "kernels" / KERNEL_DIR.name / name)
    write_json_atomic(dest / "dataset-metadata.json",
                      dataset_metadata(user, CODE_SLUG, "RSNA PE pipeline code (pe package)", license_name))
    return dest


def experiments_of_ensemble(name: str) -> tuple[Path, list[str]]:
    """weights.json of ``oof/<name>/`` and every experiment it needs (members and their CNNs)."""
    wpath = paths.exp_oof_dir(name) / "weights.json"
    if not wpath.is_file():
        raise SystemExit(f"{wpath}: not found (run src/07_ensemble.py --out {name})")
    members = list(json.loads(wpath.read_text())["members"])
    from pe.eval.ensemble import cnn_exp_of

    cnns = []
    for m in members:
        c = cnn_exp_of(m)
        if c is None:
            raise SystemExit(f"{paths.models_dir() / m}: no fold*/config.yaml naming its cnn_exp")
        cnns.append(c)
    return wpath, list(dict.fromkeys([*cnns, *members]))


def build_models(out: Path, user: str, license_name: str, experiments: list[str], folds: list[int] | None,
                 weights: Path | None, student: Path | None = None) -> Path:
    dest = out / MODELS_SLUG
    dest.mkdir(parents=True)
    if student is not None:  # the notebook passes student/model.pt to the kernel's --student
        if not student.is_file():
            raise SystemExit(f"{student}: no such student checkpoint (src/12_train_student.py writes model.pt)")
        (dest / "student").mkdir()
        shutil.copy2(student, dest / "student" / "model.pt")
    for exp in experiments:
        src_exp = Path(exp) if Path(exp).is_dir() else paths.models_dir() / exp
        runs = sorted(p.parent for p in src_exp.glob("fold*/best.pt"))
        if folds is not None:
            runs = [r for r in runs if int(r.name[len("fold"):]) in folds]
        if not runs:
            raise SystemExit(f"{src_exp}: no fold*/best.pt{' for folds ' + str(folds) if folds else ''}")
        for run in runs:
            target = dest / src_exp.name / run.name
            target.mkdir(parents=True)
            for name in ("best.pt", "config.yaml"):
                if not (run / name).is_file():
                    raise SystemExit(f"{run / name}: missing")
                shutil.copy2(run / name, target / name)
    if weights is not None:
        shutil.copy2(weights, dest / "weights.json")
    write_json_atomic(dest / "dataset-metadata.json",
                      dataset_metadata(user, MODELS_SLUG, "RSNA PE pipeline models", license_name))
    return dest


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_pins(path: Path = REPO / "requirements.txt") -> dict[str, str]:
    """``name==version`` lines of requirements.txt, by normalised name."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+).*", line)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def dependency_closure(tops: list[str], python_version: str) -> dict[str, str]:
    """Every distribution ``tops`` need on the target Python (markers evaluated for it), pinned:
    tops at their requirements.txt pins, dependencies at their installed versions; torch/torchvision
    and what only they pull in are left out."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "python_version": python_version, "python_full_version": f"{python_version}.0",
           "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "extra": ""}
    pins = requirement_pins()
    found: dict[str, str] = {}
    todo = list(tops)
    while todo:
        name = _norm(todo.pop())
        if name in found or name in EXCLUDED:
            continue
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{name}: needed on Python {python_version} but not installed here, so its version "
                             "is unknown: install it into this environment first") from None
        found[name] = pins.get(name, installed)
        for req in md.requires(name) or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate(env):
                todo.append(r.name)
    return dict(sorted(found.items()))


def expand_platforms(platforms: list[str]) -> list[str]:
    """``manylinux_2_N_arch`` also accepts every older manylinux tag (pip does not expand it itself)."""
    out: list[str] = []
    for p in platforms:
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", p)
        if m:
            arch = m.group(2)
            out += [f"manylinux_2_{g}_{arch}" for g in range(int(m.group(1)), 4, -1)]
            out += [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def build_wheels(out: Path, user: str, license_name: str, python_version: str, platforms: list[str],
                 packages: list[str]) -> Path:
    """``pip download`` (binary wheels only, no dependency resolution: the closure is pinned here) of
    ``packages`` and their dependencies for the target, with the manifest install_wheels.py reads."""
    unknown = [p for p in packages if p not in RUNTIME_PACKAGES]
    if unknown:
        raise SystemExit(f"--packages: {unknown} not in the runtime packages {sorted(RUNTIME_PACKAGES)}")
    dest = out / WHEELS_SLUG
    dest.mkdir(parents=True)
    closure = dependency_closure(packages, python_version)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
           *[a for p in expand_platforms(platforms) for a in ("--platform", p)], "--dest", str(dest),
           *[f"{n}=={v}" for n, v in closure.items()]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"pip download for Python {python_version} {platforms} failed:\n{proc.stderr[-3000:]}")
    manifest = {"python_version": python_version, "platforms": platforms,
                "packages": {p: {"version": closure[_norm(p)], "module": RUNTIME_PACKAGES[p]} for p in packages},
                "wheels": closure}
    write_json_atomic(dest / "pe_wheels.json", manifest)
    write_json_atomic(dest / "dataset-metadata.json",
                      dataset_metadata(user, WHEELS_SLUG, "RSNA PE pipeline wheels (offline install)", license_name))
    return dest


def build_kernel(out: Path, user: str) -> Path:
    dest = out / KERNEL_DIR.name
    dest.mkdir(parents=True)
    meta = json.loads((KERNEL_DIR / "kernel-metadata.json").read_text())
    meta["id"] = meta["id"].replace(PLACEHOLDER_USER, user)
    meta["dataset_sources"] = [s.replace(PLACEHOLDER_USER, user) for s in meta["dataset_sources"]]
    write_json_atomic(dest / "kernel-metadata.json", meta)
    write_text_atomic(dest / meta["code_file"], (KERNEL_DIR / meta["code_file"]).read_text())
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--user", default=os.environ.get("KAGGLE_USERNAME", PLACEHOLDER_USER))
    ap.add_argument("--models", nargs="*", default=[], help="experiment names under work/models/ (or folders)")
    ap.add_argument("--ensemble", default=None, help="ensemble name: its weights.json and all its experiments")
    ap.add_argument("--folds", type=int, nargs="*", default=None, help="only these folds (default: all)")
    ap.add_argument("--student", type=Path, default=None,
                    help="model.pt of the localisation student (work/localize/<exp>/student/): shipped as "
                         "student/model.pt; the notebook then writes localization.csv")
    ap.add_argument("--out", type=Path, default=KERNELS / "build")
    ap.add_argument("--license", default="CC0-1.0", help="license name in dataset-metadata.json")
    ap.add_argument("--wheels", action=argparse.BooleanOptionalAction, default=True,
                    help="build the offline wheels dataset (needs pip's index)")
    ap.add_argument("--python-version", default=KAGGLE_PYTHON, help="wheels target (default: %(default)s)")
    ap.add_argument("--platform", nargs="+", default=[KAGGLE_PLATFORM], help="wheels target (default: %(default)s)")
    ap.add_argument("--packages", nargs="+", default=list(RUNTIME_PACKAGES), help="runtime packages to ship")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    for sub in (CODE_SLUG, MODELS_SLUG, WHEELS_SLUG, KERNEL_DIR.name):
        shutil.rmtree(out / sub, ignore_errors=True)  # a rebuild never mixes old and new files
    built = [build_code(out, args.user, args.license)]
    experiments = list(args.models)
    weights = None
    if args.ensemble:
        weights, needed = experiments_of_ensemble(args.ensemble)
        experiments = list(dict.fromkeys([*experiments, *needed]))
    if experiments:
        built.append(build_models(out, args.user, args.license, experiments, args.folds, weights, args.student))
    if args.wheels:
        built.append(build_wheels(out, args.user, args.license, args.python_version, args.platform, args.packages))
    built.append(build_kernel(out, args.user))
    for d in built:
        n = sum(1 for p in d.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        print(f"{d}: {n} files, {size / 1e6:.1f} MB")
    if args.user == PLACEHOLDER_USER:
        print(f"note: ids use the placeholder {PLACEHOLDER_USER}; pass --user or set KAGGLE_USERNAME")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
