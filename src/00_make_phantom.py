"""Stage 00: write a synthetic RSPECT look-alike (see src/pe/synthetic/phantom.py).

Reads: nothing. Writes (CONTRACTS.md row 00): DIR/train/<study>/<series>/<sop>.dcm, DIR/test/...,
DIR/train.csv (17 columns), DIR/test.csv, DIR/sample_submission.csv (all 0.5), DIR/train_boxes.csv
(SOPInstanceUID,x,y,width,height), DIR/phantom_truth.csv (per study: lung box, labels, storage),
DIR/phantom_test_labels.csv and DIR/phantom_test_boxes.csv (test truth, for scoring the demo).
Same seed, same bytes. An existing phantom in DIR is replaced; any other data there is refused.

    python src/00_make_phantom.py --out input/phantom --train-studies 40 --test-studies 10 --seed 0
    python src/00_make_phantom.py --out input/phantom --preset demo --seed 0   # make demo's phantom
"""

from __future__ import annotations

import argparse
import inspect
import time

from pe.synthetic.phantom import (
    P_POSITIVE,
    PRESETS,
    SHORTCUT_KINDS,
    UID_STYLES,
    default_workers,
    make_phantom,
)

# sizes when neither a flag nor --preset gives them: make_phantom's own defaults (the studies' counts have
# none: required)
SIZE_DEFAULTS = {k: inspect.signature(make_phantom).parameters[k].default
                 for k in ("size", "min_slices", "max_slices", "positive_rate")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the sizes resolved: an explicit flag, else ``--preset``'s value, else the default."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (the data root of later stages)")
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="named sizes (pe.synthetic.phantom.PRESETS; demo: make demo's phantom); "
                         "the flags below override them")
    ap.add_argument("--train-studies", type=int, help="required unless --preset gives it")
    ap.add_argument("--test-studies", type=int, help="required unless --preset gives it")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--size", type=int, help=f"rows = columns of every slice (default {SIZE_DEFAULTS['size']})")
    ap.add_argument("--min-slices", type=int, help=f"default {SIZE_DEFAULTS['min_slices']}")
    ap.add_argument("--max-slices", type=int, help=f"default {SIZE_DEFAULTS['max_slices']}")
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--uid-style", choices=UID_STYLES, default="kaggle",
                    help="kaggle: 12-hex ids like the real data; dicom: 2.25.* DICOM UIDs")
    ap.add_argument("--positive-rate", type=float,
                    help=f"share of PE-positive exams (default {P_POSITIVE}, RSPECT's)")
    ap.add_argument("--shortcut-rate", type=float, default=0.0,
                    help="share of PE-positive TRAIN slices given a shortcut feature unrelated to the emboli "
                         "(never in test; 0 = none, byte-identical output)")
    ap.add_argument("--shortcut-kind", choices=SHORTCUT_KINDS, default="marker",
                    help="marker: bright disc in the chest wall; stripes: striped disc there")
    ap.add_argument("--embolus-scale", type=float, default=1.0,
                    help="scale every PE embolus (defect radius and run of slices) by this factor in (0, 2]: "
                         "< 1 harder, > 1 larger (not easier: README); 1 = none, byte-identical output")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset] if args.preset else {}
    for key in ("train_studies", "test_studies", *SIZE_DEFAULTS):
        if getattr(args, key) is None:
            value = preset.get(key, SIZE_DEFAULTS.get(key))
            if value is None:
                ap.error(f"--{key.replace('_', '-')} is required (or a --preset that gives it)")
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    make_phantom(args.out, train_studies=args.train_studies, test_studies=args.test_studies, seed=args.seed,
                 size=args.size, min_slices=args.min_slices, max_slices=args.max_slices, workers=args.workers,
                 uid_style=args.uid_style, positive_rate=args.positive_rate,
                 shortcut_rate=args.shortcut_rate, shortcut_kind=args.shortcut_kind, embolus_scale=args.embolus_scale)
    print(f"phantom written to {args.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
