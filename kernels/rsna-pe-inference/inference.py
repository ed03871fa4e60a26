"""Kaggle inference for RSNA STR PE: test DICOMs → submission.csv (logic in src/pe/infer/kernel.py).

On Kaggle (offline GPU notebook; datasets attached by kernel-metadata.json):

    python /kaggle/input/<code-dataset>/kernels/rsna-pe-inference/inference.py \
        --data-dir /kaggle/input/rsna-str-pulmonary-embolism-detection \
        --models /kaggle/input/<models-dataset> --out submission.csv

Locally (CPU, the phantom):

    python kernels/rsna-pe-inference/inference.py --data-dir input/phantom \
        --models work/demo/models --weights oof/ens_demo/weights.json --out submissions/kernel.csv

Reads   <data-dir>/<split>/**.dcm and <data-dir>/<split>.csv; model run folders
        (<exp>/fold<k>/{best.pt,config.yaml}: the CNN and the sequence experiments) and optionally the
        ensemble's weights.json (stage 07; found automatically at the top of a --models folder).
Writes  --out: the repaired submission, validated against <split>.csv; --raw-out: the blend before
        the repair; --summary-json: timing, folds used per study, repair counts, metadata problems by
        kind and every image whose prediction is a fallback, with its reason (fallback_images).

On Kaggle the notebook first runs install_wheels.py (beside this script) to install the pinned
packages offline from the rsna-pe-wheels dataset.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _add_pe_to_path() -> Path:
    """Make ``import pe`` work, and say where it came from.

    This is the one place a ``sys.path`` insertion is acceptable: a Kaggle notebook cannot
    ``pip install`` our package (no internet), so the package arrives as an attached dataset holding
    ``src/`` (built by ``make kaggle-dataset``), and locally the script runs from the repository
    without installation. Search order: $PE_SRC, the ``src/`` beside this script's repository or
    dataset copy, then every attached Kaggle dataset's ``src/``.
    """
    here = Path(__file__).resolve()
    candidates = [Path(os.environ["PE_SRC"])] if os.environ.get("PE_SRC") else []
    candidates += [here.parents[2] / "src"] if len(here.parents) > 2 else []
    candidates += sorted(Path("/kaggle/input").glob("*/src"))
    for c in candidates:
        if (c / "pe" / "__init__.py").is_file():
            sys.path.insert(0, str(c))
            return c
    raise SystemExit(f"cannot find the pe package (src/pe/__init__.py) in {[str(c) for c in candidates]}")


PE_SRC = _add_pe_to_path()

from pe.infer.kernel import InferenceConfig, InferenceError, run_inference  # noqa: E402
from pe.io import write_json_atomic  # noqa: E402

KAGGLE_DATA = Path("/kaggle/input/rsna-str-pulmonary-embolism-detection")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=KAGGLE_DATA if KAGGLE_DATA.is_dir() else None,
                    help="competition data root (default on Kaggle: %(default)s)")
    ap.add_argument("--models", type=Path, nargs="+", required=True,
                    help="run folders <exp>/fold<k>, experiment folders, or a root holding experiments")
    ap.add_argument("--weights", type=Path, default=None, help="weights.json of src/07_ensemble.py")
    ap.add_argument("--out", type=Path, default=Path("submission.csv"))
    ap.add_argument("--raw-out", type=Path, default=None, help="also write the blend before the repair")
    ap.add_argument("--summary-json", type=Path, default=None)
    ap.add_argument("--split", default="test")
    ap.add_argument("--jpeg-roundtrip", action=argparse.BooleanOptionalAction, default=True,
                    help="pass each slice through the cache's JPEG encoding (matches training inputs)")
    ap.add_argument("--jpeg-quality", type=int, default=95)
    ap.add_argument("--image-size", type=int, default=None, help="default: the CNN's cache size")
    ap.add_argument("--budget-hours", type=float, default=8.5,
                    help="fall back to fewer fold models when the projected total exceeds this")
    ap.add_argument("--probe-studies", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="DICOM decoding processes (0: in-process)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--student", type=Path, default=None,
                    help="model.pt of the localisation student (src/12_train_student.py): also write its PE clusters")
    ap.add_argument("--localization-out", type=Path, default=None,
                    help="CSV of the student's clusters (default: localization.csv next to --out)")
    args = ap.parse_args(argv)
    if args.data_dir is None:
        ap.error("--data-dir is required outside Kaggle")
    cfg = InferenceConfig(
        data_dir=args.data_dir, models=list(args.models), out=args.out, weights=args.weights, split=args.split,
        jpeg_roundtrip=args.jpeg_roundtrip, jpeg_quality=args.jpeg_quality, image_size=args.image_size,
        budget_hours=args.budget_hours, probe_studies=args.probe_studies, workers=args.workers,
        batch_size=args.batch_size, device=args.device, raw_out=args.raw_out, progress=not args.no_progress,
        student=args.student, localization_out=args.localization_out)
    print(f"pe package: {PE_SRC}")
    try:
        summary = run_inference(cfg)
    except (InferenceError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.summary_json:
        write_json_atomic(args.summary_json, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
