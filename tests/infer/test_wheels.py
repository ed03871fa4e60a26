"""The offline wheels dataset (kernels/make_kaggle_dataset.py --wheels, install_wheels.py): built for
this machine's Python, installed with pip --no-index into a fresh virtual environment that sees no
pip configuration, and used there by the kernel's reader (pe.data.dicom) to decode one phantom file of
every transfer syntax the phantom writes, with the same HU as the project's environment.

The decode check needs only pydicom, GDCM and pylibjpeg (timm and albumentations pull in torch,
which no offline folder here holds), so the folder is built with ``--packages`` of those.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import venv
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
DECODERS = ["pydicom", "python-gdcm", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle"]
SYNTAXES = {"1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1"}


def _module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _offline_env() -> dict[str, str]:
    """No pip configuration (this machine's pip.conf adds local indexes and find-links): truly offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"}


def test_dependency_closure_pins_and_excludes_torch() -> None:
    mk = _module(REPO / "kernels" / "make_kaggle_dataset.py")
    pins = mk.requirement_pins()
    closure = mk.dependency_closure(["timm", "albumentations", "pylibjpeg"], "3.11")
    assert closure["timm"] == pins["timm"] and closure["albumentations"] == pins["albumentations"]
    assert "torch" not in closure and "torchvision" not in closure and "numpy" in closure
    assert "safetensors" in closure  # a dependency of timm other than torch
    assert mk.expand_platforms(["manylinux_2_31_x86_64"])[:2] == ["manylinux_2_31_x86_64", "manylinux_2_30_x86_64"]
    with pytest.raises(SystemExit, match="not in the runtime packages"):
        mk.build_wheels(Path("/nonexistent"), "u", "CC0-1.0", "3.11", ["any"], ["requests"])


@pytest.mark.slow
def test_wheels_install_offline_and_decode_every_phantom_syntax(tmp_path: Path) -> None:
    from pe.data.dicom import read_hu
    from pe.synthetic.phantom import TRUTH_FILE, make_phantom

    # One phantom file per transfer syntax, and its HU as read here.
    make_phantom(tmp_path / "ph", train_studies=4, test_studies=0, seed=3, size=32, min_slices=4, max_slices=4)
    truth = pd.read_csv(tmp_path / "ph" / TRUTH_FILE).drop_duplicates("transfer_syntax")
    assert SYNTAXES <= set(truth["transfer_syntax"])
    files = {ts: next((tmp_path / "ph" / "train" / s).glob("*/*.dcm"))
             for ts, s in zip(truth["transfer_syntax"], truth["StudyInstanceUID"], strict=True) if ts in SYNTAXES}
    expected = {ts: read_hu(f) for ts, f in files.items()}

    # The wheels folder for this machine's Python, through the CLI make kaggle-dataset runs.
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    glibc = platform.libc_ver()[1].split(".")
    plat = f"manylinux_{glibc[0]}_{glibc[1]}_{platform.machine()}"
    build = tmp_path / "build"
    proc = subprocess.run([sys.executable, str(REPO / "kernels" / "make_kaggle_dataset.py"), "--out", str(build),
                           "--user", "u", "--python-version", pyver, "--platform", plat, "--packages", *DECODERS],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = build / "rsna-pe-wheels"
    manifest = json.loads((wheels / "pe_wheels.json").read_text())
    assert set(manifest["packages"]) == set(DECODERS) and manifest["python_version"] == pyver
    assert json.loads((wheels / "dataset-metadata.json").read_text())["id"] == "u/rsna-pe-wheels"
    assert not list(wheels.glob("torch*")) and list(wheels.glob("numpy-*.whl"))

    # A fresh venv (no system site-packages), the notebook's installer, then the kernel's reader.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    py = str(env_dir / "bin" / "python")
    installer = build / "rsna-pe-src" / "kernels" / "rsna-pe-inference" / "install_wheels.py"
    env = _offline_env()
    proc = subprocess.run([py, str(installer), "--wheels", str(wheels)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    again = subprocess.run([py, str(installer), "--wheels", str(wheels)], capture_output=True, text=True, env=env)
    assert "already importable" in again.stdout  # a second run installs nothing
    script = ("import sys, json, numpy as np, gdcm\n"
              "from pe.data.dicom import read_hu\n"
              "files = json.loads(sys.argv[1])\n"
              "for ts, f in files.items(): np.save(sys.argv[2] + '/' + ts + '.npy', read_hu(f))\n")
    out = tmp_path / "decoded"
    out.mkdir()
    proc = subprocess.run([py, "-c", script, json.dumps({k: str(v) for k, v in files.items()}), str(out)],
                          capture_output=True, text=True, env={**env, "PYTHONPATH": str(build / "rsna-pe-src" / "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for ts, hu in expected.items():
        np.testing.assert_array_equal(np.load(out / f"{ts}.npy"), hu, err_msg=ts)
