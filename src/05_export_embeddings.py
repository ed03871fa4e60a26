"""Stage 05: out-of-fold per-slice CNN embeddings for the sequence stage.

Reads  work/models/<exp>/fold<k>/best.pt (stage 04), the JPEG cache named in its config,
       work/folds.csv (train split) and work/meta/<split>.parquet.
Writes work/embeddings/<exp>/fold<k>/<split>/<StudyInstanceUID>.npy (float16, slices in z order × D),
       .../<split>/parts/<StudyInstanceUID>.parquet and .../<split>/index.parquet
       (StudyInstanceUID, SOPInstanceUID, slice_index, prob).
Train split: fold k's model embeds only fold k's (validation) studies; test split: every test study;
train_fit split: the studies fold k's model was trained on (in-sample), read by a stage 2 with
``train_embeddings: fold_model`` so that training, validation and test inputs of its fold k all come
from the same CNN (independently trained CNNs do not share an embedding basis).
Resumable: studies already exported are skipped.
With --maps also the reduced per-slice feature maps for the ConvLSTM stage II (shi2020):
       .../<split>/maps/<StudyInstanceUID>.npy (float16, stored slices in z order × C × k × k: the last
       feature map average-pooled to k × k, channels by a fixed seeded orthogonal projection),
       .../<split>/maps/{reduction.json,projection.npy}; prints the projected size for RSPECT.

    python src/05_export_embeddings.py --exp demo --split train
    python src/05_export_embeddings.py --exp demo --split test --fold 0
    python src/05_export_embeddings.py --exp demo --split train --maps [--map-size 8 --map-channels 64
                                       --map-seed 0 --slab-every 1]
"""

from __future__ import annotations

import argparse

from pe.infer.embeddings import export_embeddings
from pe.models.convlstm import DEFAULT_EXPORT, MapReduction


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exp", required=True, help="stage-1 experiment name (work/models/<exp>/)")
    ap.add_argument("--fold", type=int, default=None, help="one fold (default: every fold with a best.pt)")
    ap.add_argument("--split", choices=["train", "test", "train_fit"], default="train",
                    help="train: fold k's validation studies (out-of-fold); test: every test study; train_fit: "
                         "the studies fold k's model trained on (for a stage 2 with train_embeddings=fold_model)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--maps", action="store_true", help="also export reduced feature maps (ConvLSTM stage II)")
    ap.add_argument("--map-size", type=int, default=DEFAULT_EXPORT["k"], help="k of the k x k maps")
    ap.add_argument("--map-channels", type=int, default=DEFAULT_EXPORT["channels"], help="channels C after projection")
    ap.add_argument("--map-seed", type=int, default=0, help="seed of the orthogonal channel projection")
    ap.add_argument("--slab-every", type=int, default=DEFAULT_EXPORT["slab_every"],
                    help="store the maps of every s-th slice only (1 = every slice)")
    args = ap.parse_args(argv)
    maps = MapReduction(k=args.map_size, channels=args.map_channels, seed=args.map_seed,
                        slab_every=args.slab_every) if args.maps else None
    export_embeddings(args.exp, args.split, folds=None if args.fold is None else [args.fold],
                      device=args.device, batch_size=args.batch_size, maps=maps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
