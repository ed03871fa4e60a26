"""Stage 10: an offline HTML report of one experiment's out-of-fold predictions.

Reads  oof/<exp>/oof.csv (or oof/<exp>/fold<k>.csv), <data_dir>/train.csv; for the explanation maps
       work/folds.csv, work/models/<cnn_exp>/fold<k>/best.pt, the JPEG cache, oof/<cnn_exp>/cnn_fold<k>.parquet,
       work/meta/train.parquet and, when present, <data_dir>/train_boxes.csv (pointing game).
Writes reports/<exp>/index.html with its PNGs and report.json (or --out DIR); prints the score of
       each prediction set and the pointing-game figures.

    python src/10_report.py --exp ens_demo [--cnn-exp demo] [--out reports/ens_demo] [--n-studies 6]
                            [--n-cams 8] [--ig]
"""

from __future__ import annotations

import argparse
import logging
import sys

from pe.report.build import build_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exp", required=True, help="experiment whose OOF predictions are reported (oof/<exp>/)")
    ap.add_argument("--cnn-exp", default=None,
                    help="stage-1 CNN experiment for explanation maps (default: the cnn_exp of the "
                         "sequence configs behind --exp, else 'demo')")
    ap.add_argument("--out", default=None, help="output folder (default reports/<exp>)")
    ap.add_argument("--truth", default=None, help="train.csv-shaped truth (default <data_dir>/train.csv)")
    ap.add_argument("--n-studies", type=int, default=6, help="studies in the slice-probability figure")
    ap.add_argument("--n-cams", type=int, default=8, help="slices in the explanation-map figure")
    ap.add_argument("--ig", action="store_true", help="also compute integrated gradients (slower)")
    ap.add_argument("--ig-steps", type=int, default=32, help="integration steps for --ig")
    ap.add_argument("--max-pointing", type=int, default=256,
                    help="at most this many boxed positive slices in the pointing game (random sample)")
    ap.add_argument("--cam-layer", default=None,
                    help="dotted module name for Grad-CAM (default: the CNN's gradcam_layer, its last "
                         "feature map), e.g. backbone.blocks.3 for finer maps")
    ap.add_argument("--no-explain", action="store_true", help="skip the explanation maps")
    ap.add_argument("--device", default="cpu", help="torch device for the explanation maps")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = build_report(args.exp, out_dir=args.out, cnn_exp=args.cnn_exp, n_studies=args.n_studies,
                               n_cams=args.n_cams, ig=args.ig, ig_steps=args.ig_steps,
                               max_pointing=args.max_pointing, device=args.device, truth_path=args.truth,
                               explain=not args.no_explain, cam_layer=args.cam_layer)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, bd in summary["breakdowns"].items():
        print(f"{name:<9} score {bd['score']:.6f}  study PE AUC {bd['study_pe_auc']:.4f}  "
              f"image AUC {bd['image_auc']:.4f}")
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"report: {summary['index']}")
    return 1 if "explain_error" in summary else 0


if __name__ == "__main__":
    raise SystemExit(main())
