"""The phantom's ``embolus_scale`` option: every PE embolus of a planned study made smaller (< 1, the
quality benchmark's harder phantom) or larger (> 1), after all random draws, so that everything else
in the study is as at scale 1."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# Largest defect radius / vessel radius an embolus scaled up may get: the drawing keeps a chronic
# defect against the wall with 0.08 of the radius to spare, and the vessel's rim shows.
FRAC_MAX = 0.9


def scale_emboli(emboli: Sequence[Any], scale: float, host_of: Callable[[Any], list[int]]) -> None:
    """Scale ``emboli`` in place (phantom_plan.Embolus objects, typed Any because that module imports
    this one). < 1: defect radius x scale, run of slices cut to round(run x scale) >= 1 around its
    middle. > 1: defect radius x scale up to FRAC_MAX, run grown to round(run x scale) slices of its
    host vessel (``host_of(embolus)``, the slices the vessel shows on), evenly on both sides."""
    for e in emboli:
        e.frac = min(FRAC_MAX, e.frac * scale)
        keep = max(1, round(len(e.slices) * scale))
        if keep <= len(e.slices):
            cut = (len(e.slices) - keep) // 2
            e.slices = e.slices[cut:cut + keep]
        else:
            e.slices = _grow_run(e.slices, host_of(e), keep)


def _grow_run(run: list[int], host: list[int], keep: int) -> list[int]:
    """``run`` (consecutive slices of ``host``) grown to ``keep`` slices of the same host where the host
    allows; a run placed outside its host (a sparse study's fallback) stays."""
    if not run or run[0] not in host:
        return run
    i0 = host.index(run[0])
    start = max(0, i0 - (keep - len(run)) // 2)
    end = min(len(host), start + keep)
    start = max(0, end - keep)
    return host[start:end]
