"""Stage 04: train the 2.5D slice CNN of one experiment on one fold (``--fold -1``: all folds), or on
several folds one after the other in this process (``--fold 0,1,2``: one interpreter start-up).

Reads  the config YAML (+ trailing key=value overrides), the train metadata, folds CSV and JPEG
       cache it names (defaults from src/pe/paths.py)
Writes work/models/<exp>/fold<k>/{config.yaml, metrics.jsonl, last.pt, best.pt} and
       oof/<exp>/cnn_fold<k>.parquet (SOPInstanceUID, StudyInstanceUID, prob) of the fold's
       validation studies; with several folds it then prints their pooled out-of-fold slice AUC

    python src/04_train_cnn.py --config src/configs/demo.yaml --fold 0 [--resume] [epochs=2 lr=1e-3 | --epochs 2]
    python src/04_train_cnn.py --config src/configs/demo.yaml --fold 0,1,2
    torchrun --nproc_per_node 4 src/04_train_cnn.py --config src/configs/cnn_effv2s_512.yaml --fold 0
"""

from __future__ import annotations

import argparse
import sys

from pe.config import CNNConfig, load_config, parse_folds
from pe.distributed import env_rank
from pe.train.cnn import pooled_oof_auc, train_fold

KNOWN = {"--config", "--fold", "--resume", "-h", "--help"}


def dash_overrides(argv: list[str]) -> list[str]:
    """Rewrite config options given as ``--key value`` / ``--key=value`` to ``key=value`` items."""
    out, i = [], 0
    while i < len(argv):
        item = argv[i]
        name = item.split("=", 1)[0]
        if item.startswith("--") and name not in KNOWN:
            if "=" in item:
                out.append(item[2:])
                i += 1
                continue
            if i + 1 >= len(argv):
                raise SystemExit(f"{item} needs a value")
            out.append(f"{item[2:]}={argv[i + 1]}")
            i += 2
            continue
        out.append(item)
        if item in ("--config", "--fold") and i + 1 < len(argv):
            out.append(argv[i + 1])
            i += 1
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="experiment YAML (src/configs/<exp>.yaml)")
    ap.add_argument("--fold", type=parse_folds, required=True,
                    help="validation fold, or a comma-separated list of folds; -1 trains on all folds")
    ap.add_argument("--resume", action="store_true", help="continue from the run folder's last.pt")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (or --key value)")
    args = ap.parse_args(dash_overrides(sys.argv[1:] if argv is None else argv))
    for fold in args.fold:
        cfg = load_config(CNNConfig, args.config, args.overrides)
        run = train_fold(cfg, fold, resume=args.resume)
        print(f"run folder: {run}", flush=True)
    if len(args.fold) > 1 and -1 not in args.fold and env_rank() == 0:  # the main rank
        score, n, pos = pooled_oof_auc(cfg, args.fold)
        print(f"pooled out-of-fold slice AUC, folds {','.join(map(str, args.fold))}: {score:.4f} "
              f"({n} slices, {pos} positive)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
