"""The CNN's 2.5D inference batch, built where the model runs.

Inference stacks each slice with its neighbours (``3·(2n+1)`` channels). Doing that on the CPU in
channels-last numpy, transposing every stacked input and normalising in float32 there cost about
80 ms per 512 px input on one core: on an H100 the kernel path ran at 10 slices/s end to end
(``make bench-gpu``, 2026-11-28), the CPU work of a single process being the bottleneck. Here every
resized slice is moved to channels-first once (OpenCV's channel split on the CPU; a permute on the
GPU after uploading uint8, 4x less to move than float32), the neighbour stacks are gathered by index
and normalised on the target device. Values are identical to stacking and normalising on the CPU.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import cv2
import numpy as np
import torch

from pe.data.slices import normalize


def dedupe_rows(rows: Sequence[Sequence[Hashable]]) -> tuple[list[Hashable], np.ndarray]:
    """(unique keys in first-seen order, (b, k) int64 positions of each row's keys in that list)."""
    pos: dict[Hashable, int] = {}
    gather = np.array([[pos.setdefault(key, len(pos)) for key in row] for row in rows], dtype=np.int64)
    return list(pos), gather.reshape(len(rows), -1) if len(rows) else np.zeros((0, 0), np.int64)


def stacked_inputs(slices: Sequence[np.ndarray], gather: np.ndarray, device: str | torch.device = "cpu",
                   channels_last: bool = False) -> torch.Tensor:
    """float32 (b, 3·k, S, S) normalised inputs on ``device``: row i stacks ``slices[gather[i, 0]]``,
    ``slices[gather[i, 1]]``, ... (each a uint8 (S, S, 3) image) along the channels; in channels-last
    memory on a GPU when ``channels_last``."""
    dev = torch.device(device)
    if dev.type == "cpu":
        planes = torch.from_numpy(np.stack([np.stack(cv2.split(a)) for a in slices]))
    else:
        planes = torch.from_numpy(np.stack(slices)).to(dev, non_blocking=False).permute(0, 3, 1, 2)
    x = normalize(planes[torch.as_tensor(gather, device=dev)].flatten(1, 2))
    # channels-last on the GPU only: on the CPU the copy costs more than the convolutions gain
    return x.contiguous(memory_format=torch.channels_last) if channels_last and dev.type != "cpu" else x
