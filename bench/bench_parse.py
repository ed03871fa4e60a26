"""Benchmark of stage 01: DICOM headers parsed per second (target: >= 1,500/s on 2 cores, so the
1.79 M RSPECT training files parse in under 20 minutes).

Generates a phantom once (default ~3,500 files at 512 px, so file sizes are realistic) under
``--dir`` (reused when it is already there), then runs :func:`pe.data.metadata.parse_metadata` on its
train split with each worker count and prints files/s, end to end (listing, parsing, checks,
writing). The first, untimed pass warms the page cache so the figures measure parsing, not the disk.

    python bench/bench_parse.py [--dir /tmp/pe_bench_parse] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pe.data.metadata import list_files, parse_metadata  # noqa: E402
from pe.synthetic.phantom import TRUTH_FILE, make_phantom  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "pe_bench_parse"))
    ap.add_argument("--studies", type=int, default=50)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per worker count (best is printed)")
    args = ap.parse_args(argv)
    data = Path(args.dir)
    if not (data / TRUTH_FILE).exists():
        t0 = time.time()
        make_phantom(data, train_studies=args.studies, test_studies=1, seed=2024, size=args.size,
                     min_slices=60, max_slices=80, workers=2)
        print(f"generated {data} in {time.time() - t0:.1f} s")
    n = len(list_files(data / "train"))
    out = Path(tempfile.mkdtemp(prefix="pe_bench_meta_")) / "train.parquet"
    parse_metadata(data, "train", out, workers=1)  # warm the page cache
    print(f"files: {n} ({args.size} px); load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    rows = []
    for w in args.workers:
        wall, cpu = min(_timed(data, out, w) for _ in range(args.repeats))
        rows.append(f"workers={w}: {n / wall:,.0f} files/s wall ({wall:.2f} s for {n} files); "
                    f"{n / cpu:,.0f} files per CPU-second")
    print("\n".join(rows))
    print("(wall figures depend on the machine's load; files per CPU-second x cores is the quiet-machine bound)")
    return 0


def _timed(data: Path, out: Path, workers: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process plus its finished workers) of one full parse."""
    c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    parse_metadata(data, "train", out, workers=workers)
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in zip(c0, c1, strict=True))
    return wall, cpu


if __name__ == "__main__":
    raise SystemExit(main())
