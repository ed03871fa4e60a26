"""pe.data.stacking: the inference batch gathered from once-transposed slices equals the plain
channels-last stack of every neighbour, normalised on the CPU."""

from __future__ import annotations

import numpy as np
import torch

from pe.data.slices import normalize, stack_neighbors, to_uint8_tensor
from pe.data.stacking import dedupe_rows, stacked_inputs


def test_dedupe_rows_keeps_first_seen_order_and_positions() -> None:
    keys, gather = dedupe_rows([[0, 0, 1], [0, 1, 2], [1, 2, 2]])
    assert keys == [0, 1, 2]
    np.testing.assert_array_equal(gather, [[0, 0, 1], [0, 1, 2], [1, 2, 2]])
    keys, gather = dedupe_rows([[("b", 1), ("a", 2)], [("a", 2), ("b", 1)]])
    assert keys == [("b", 1), ("a", 2)]
    np.testing.assert_array_equal(gather, [[0, 1], [1, 0]])
    keys, gather = dedupe_rows([])
    assert keys == [] and gather.shape == (0, 0)


def test_stacked_inputs_equal_the_plain_stack_with_edge_repetition() -> None:
    rng = np.random.default_rng(0)
    n, neighbors = 7, 2
    slices = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(n)]
    rows = [[min(max(c + d, 0), n - 1) for d in range(-neighbors, neighbors + 1)] for c in range(n)]
    keys, gather = dedupe_rows(rows)
    got = stacked_inputs([slices[k] for k in keys], gather, "cpu", channels_last=True)
    want = normalize(torch.stack([to_uint8_tensor(stack_neighbors(slices, c, neighbors)) for c in range(n)]))
    assert got.shape == (n, 3 * (2 * neighbors + 1), 24, 24) and got.dtype == torch.float32
    assert torch.equal(got, want)
    # a batch of later rows only: the gather is relative to the slices handed over
    keys, gather = dedupe_rows(rows[5:])
    assert torch.equal(stacked_inputs([slices[k] for k in keys], gather), want[5:])


def test_normalize_leaves_a_float_input_untouched() -> None:
    x = torch.full((1, 3, 2, 2), 128.0)
    y = normalize(x)
    assert torch.equal(x, torch.full((1, 3, 2, 2), 128.0)) and not torch.equal(x, y)
