"""How the 3D student starts and ends training, per seed (the seed lottery of sessions 24-26).

For student seeds 0..N-1: the mean PE probability a fresh network (stage 12's DynUNet, default Seg3DConfig)
predicts on a fixed random crop, with MONAI's initialisation and with the prior initialisation. For each
stage-12 folder given: its training losses from model.pt (first batch, mean of the first and last 200
iterations) and the prior it was trained with.

    python bench/student_start.py --seeds 8
    python bench/student_start.py --seeds 4 --student seed0=work/localize/cnn/student --student seed1=...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pe.localize.student import StudentConfig, fresh_network  # noqa: E402
from pe.models.seg3d import Seg3DConfig  # noqa: E402


def start_probability(seed: int, crop: torch.Tensor, prior: float | None) -> float:
    """Mean PE probability of a fresh network built at ``seed`` (as train_student builds it) on ``crop``."""
    model = fresh_network(Seg3DConfig(), seed, prior)
    model.train()  # as in the first training step (instance norm uses the batch's statistics either way)
    with torch.no_grad():
        return float(torch.softmax(model(crop), 1)[:, 1].mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=8, help="student seeds 0..N-1 to build")
    ap.add_argument("--prior", type=float, default=StudentConfig.prior)
    ap.add_argument("--crop", type=int, nargs=3, default=[16, 64, 64], metavar=("Z", "Y", "X"),
                    help="crop size (stage 12's default)")
    ap.add_argument("--student", action="append", default=[], metavar="NAME=DIR", help="a stage-12 output folder")
    a = ap.parse_args(argv)
    crop = torch.rand((2, 1, *a.crop), generator=torch.Generator().manual_seed(0))
    print(f"fresh network, mean PE probability on a random crop {tuple(crop.shape)} (MONAI's start / prior {a.prior})")
    for seed in range(a.seeds):
        print(f"  seed {seed}: {start_probability(seed, crop, None):.3f} / {start_probability(seed, crop, a.prior):.4f}")
    if a.student:
        print(f"{'student':<24} {'prior':>6} {'first batch':>12} {'first 200':>10} {'last 200':>9}")
    for item in a.student:
        name, _, folder = item.partition("=")
        ckpt = torch.load(Path(folder) / "model.pt", map_location="cpu", weights_only=True)
        h = np.asarray(ckpt["history"], float)
        prior = ckpt["config"]["student"].get("prior")
        print(f"{name:<24} {prior if prior is not None else 'none':>6} {h[0]:>12.3f} {h[:200].mean():>10.3f} "
              f"{h[-200:].mean():>9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
