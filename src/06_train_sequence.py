"""Stage 06: train the BiGRU/BiLSTM + attention sequence model of one fold on the metric.

Reads  src/configs/<seq_exp>.yaml (pe.train.seq.SeqConfig), work/embeddings/<cnn_exp>/fold<j>/train
       for every fold j (OOF embeddings: folds != k train, fold k validates),
       work/embeddings/<cnn_exp>/fold<k>/test, work/meta/train.parquet (labels), work/folds.csv (check).
Writes work/models/<seq_exp>/fold<k>/{config.yaml, metrics.jsonl, best.pt},
       oof/<seq_exp>/fold<k>.csv and oof/<seq_exp>/test_fold<k>.csv (id,label),
       oof/<seq_exp>/summary.json; prints the OOF summary over every fold done so far
       (before/after hierarchy repair, prior and max-aggregation baselines on the same studies).

    python src/06_train_sequence.py --config src/configs/seq_demo_gru.yaml --fold 0 [epochs=5 ...]
"""

from __future__ import annotations

import argparse
import json

from pe.config import SeqConfig, load_config
from pe.train.seq import format_summary, oof_summary, train_fold


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML overriding pe.train.seq.SeqConfig")
    ap.add_argument("--fold", type=int, required=True, help="validation fold k")
    ap.add_argument("--no-summary", action="store_true", help="skip the OOF summary")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    cfg = load_config(SeqConfig, args.config, args.overrides)
    info = train_fold(cfg, args.fold)
    print(json.dumps(info, sort_keys=True))
    if not args.no_summary:
        summary = oof_summary(cfg)
        if summary is not None:
            print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
