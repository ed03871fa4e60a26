"""Stage 06: train the BiGRU/BiLSTM + attention sequence model of one fold on the metric.

Reads  src/configs/<seq_exp>.yaml (pe.train.seq.SeqConfig), work/embeddings/<cnn_exp>/fold<j>/train
       for every fold j (OOF embeddings: folds != k train, fold k validates),
       work/embeddings/<cnn_exp>/fold<k>/test, work/meta/train.parquet (labels), work/folds.csv (check).
Writes work/models/<seq_exp>/fold<k>/{config.yaml, metrics.jsonl, best.pt},
       oof/<seq_exp>/fold<k>.csv and oof/<seq_exp>/test_fold<k>.csv (id,label),
       oof/<seq_exp>/summary.json; prints the OOF summary over every fold done so far
       (before/after hierarchy repair, prior and max-aggregation baselines on the same studies).

    python src/06_train_sequence.py --config src/configs/seq_demo_gru.yaml --fold 0 [epochs=5 ...]
    python src/06_train_sequence.py --config src/configs/seq_demo_gru.yaml --fold 0,1,2  (one process)

A config with ``model: convlstm`` (pe.config.ConvLSTMSeqConfig, e.g. src/configs/seq_demo_convlstm.yaml)
trains the ConvLSTM stage II (pe.train.convlstm) over the reduced feature maps of
``src/05_export_embeddings.py --maps`` instead, writing the same files:

    python src/06_train_sequence.py --config src/configs/seq_demo_convlstm.yaml --fold 0,1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from pe.config import ConfigError, ConvLSTMSeqConfig, SeqConfig, load_config, parse_folds, parse_overrides
from pe.train.seq import format_summary, oof_summary, train_fold


def stage_of(config: str, overrides: list[str]) -> tuple[type, Any]:
    """(config dataclass, train_fold) for the YAML's ``model`` key (an override wins): ``convlstm``
    → the ConvLSTM stage, absent → the BiGRU/BiLSTM stage."""
    p = Path(config)
    loaded = (yaml.safe_load(p.read_text()) or {}) if p.is_file() else {}
    model = parse_overrides(overrides).get("model", loaded.get("model") if isinstance(loaded, dict) else None)
    if model == "convlstm":
        from pe.train.convlstm import train_fold as train_convlstm

        return ConvLSTMSeqConfig, train_convlstm
    if model is not None:
        raise ConfigError(f"{config}: model must be 'convlstm' or absent (BiGRU/BiLSTM), got {model!r}")
    return SeqConfig, train_fold


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML overriding pe.train.seq.SeqConfig")
    ap.add_argument("--fold", type=parse_folds, required=True, help="validation fold k, or a list k1,k2,...")
    ap.add_argument("--no-summary", action="store_true", help="skip the OOF summary")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    cls, train = stage_of(args.config, args.overrides)
    for fold in args.fold:
        cfg = load_config(cls, args.config, args.overrides)
        info = train(cfg, fold)
        print(json.dumps(info, sort_keys=True), flush=True)
    if not args.no_summary:
        summary = oof_summary(cfg)
        if summary is not None:
            print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
