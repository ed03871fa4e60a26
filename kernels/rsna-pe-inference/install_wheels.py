"""Install the kernel's runtime packages from the wheels dataset, offline (the notebook's first cell).

    python install_wheels.py [--wheels DIR] [--dry-run]

The Kaggle notebook runs with the internet off, and the image may lack GDCM / pylibjpeg (needed for
the compressed test DICOMs) or hold other versions of pydicom, timm or albumentations than the
models were trained with. ``make kaggle-dataset`` downloads the pinned wheels into the
``rsna-pe-wheels`` dataset with a manifest, ``pe_wheels.json`` (packages → version and import name).
This script installs, with ``pip install --no-index --find-links DIR``, only the packages that are not
importable at the pinned version; pip takes their dependencies from the same folder and keeps the
ones the image already satisfies. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

MANIFEST = "pe_wheels.json"


def find_wheels_dir(explicit: Path | None = None) -> Path:
    """The folder holding ``pe_wheels.json``: ``explicit``, else the first attached Kaggle dataset with one."""
    if explicit is not None:
        if not (explicit / MANIFEST).is_file():
            raise SystemExit(f"{explicit / MANIFEST}: not found (build it with make kaggle-dataset)")
        return explicit
    found = sorted(Path("/kaggle/input").glob(f"*/{MANIFEST}"))
    if not found:
        raise SystemExit(f"no attached dataset holds {MANIFEST}: attach rsna-pe-wheels (make kaggle-dataset)")
    return found[0].parent


def installed_version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def missing_packages(manifest: dict) -> list[str]:
    """``name==version`` of every manifest package not importable at its pinned version."""
    need = []
    for dist, info in manifest["packages"].items():
        have = installed_version(dist)
        importable = importlib.util.find_spec(info["module"]) is not None
        if have != info["version"] or not importable:
            need.append(f"{dist}=={info['version']}")
    return need


def install(wheels: Path, dry_run: bool = False) -> list[str]:
    """Install what is missing; returns the requirements that were (or would be) installed."""
    manifest = json.loads((wheels / MANIFEST).read_text())
    need = missing_packages(manifest)
    if not need:
        print(f"wheels: all {len(manifest['packages'])} packages already importable at the pinned versions")
        return need
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
           "--disable-pip-version-check", *need]
    print("wheels: " + " ".join(cmd))
    if not dry_run:
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
        still = missing_packages(manifest)
        if still:
            raise SystemExit(f"wheels: still not importable after installing from {wheels}: {still}")
    return need


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, default=None, help="default: the attached dataset holding pe_wheels.json")
    ap.add_argument("--dry-run", action="store_true", help="print what would be installed")
    args = ap.parse_args(argv)
    install(find_wheels_dir(args.wheels), args.dry_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
