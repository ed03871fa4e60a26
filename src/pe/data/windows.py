"""CT display windows and the 3-window RGB image every model sees (cache, Kaggle kernel, tests).

Channel c of :func:`window_rgb` is ``round(clip((HU - (center - width/2)) / width, 0, 1) * 255)``
for the windows below in the order R, G, B. The numba kernel evaluates exactly that expression in
float64 with round-half-to-even (as ``np.round``), so it equals the float64 numpy reference
:func:`window_rgb_reference` bit for bit (tested), at several times its speed and without the
large temporaries that make numpy slow in a fresh worker process (RSPECT.md, practical notes).
"""

from __future__ import annotations

import numba
import numpy as np

from pe.data.dicom import hu_from_pixels

# (center, width) in HU. These are the windows listed in /work/shared/RSPECT.md ("Windows commonly
# used"), the ones the top RSPECT solutions fed their CNNs: R = lung, G = PE (pulmonary artery
# contrast), B = mediastinal.
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "pe": (100.0, 700.0),
    "mediastinal": (40.0, 400.0),
}
CHANNELS: tuple[str, ...] = ("lung", "pe", "mediastinal")  # R, G, B


def _window_table() -> np.ndarray:
    """(3, 2) float64: (lower bound, width) of each channel in R, G, B order."""
    return np.array([[c - w / 2.0, w] for c, w in (WINDOWS[k] for k in CHANNELS)], dtype=np.float64)


_TABLE = _window_table()
_TABLE_BGR = np.ascontiguousarray(_TABLE[::-1])


@numba.njit(cache=True, nogil=True, fastmath=False)
def _window_kernel(hu: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    # One row and one channel at a time into a contiguous scratch row: the inner loop then
    # vectorises (SIMD float64 division), ~2x faster than looping channels innermost.
    rows, cols = hu.shape
    row = np.empty(cols, np.uint8)
    for i in range(rows):
        for c in range(table.shape[0]):
            lo = table[c, 0]
            w = table[c, 1]
            for j in range(cols):
                v = (np.float64(hu[i, j]) - lo) / w
                v = min(max(v, 0.0), 1.0)
                row[j] = np.uint8(np.rint(v * 255.0))
            for j in range(cols):
                out[i, j, c] = row[j]


def window_rgb(hu: np.ndarray, out: np.ndarray | None = None, bgr: bool = False) -> np.ndarray:
    """uint8 (H, W, 3) image of a HU slice (H, W): R = lung, G = PE, B = mediastinal window.

    ``out`` (uint8, (H, W, 3), C-contiguous) is filled in place when given, so a worker can reuse
    one buffer. ``bgr=True`` writes the channels in OpenCV's B, G, R order (same image, for
    ``cv2.imencode`` without a colour conversion).
    """
    if hu.ndim != 2:
        raise ValueError(f"window_rgb expects one 2-D slice, got shape {hu.shape}")
    if out is None:
        out = np.empty((*hu.shape, 3), dtype=np.uint8)
    elif out.shape != (*hu.shape, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 {(*hu.shape, 3)}, got {out.dtype} {out.shape}")
    _window_kernel(np.ascontiguousarray(hu), _TABLE_BGR if bgr else _TABLE, out)
    return out


def window_rgb_reference(hu: np.ndarray) -> np.ndarray:
    """Plain float64 numpy version of :func:`window_rgb` (the definition; for tests and baselines)."""
    h = np.asarray(hu, dtype=np.float64)
    chans = [np.round(np.clip((h - (c - w / 2.0)) / w, 0.0, 1.0) * 255.0) for c, w in (WINDOWS[k] for k in CHANNELS)]
    return np.stack(chans, axis=-1).astype(np.uint8)


# --- exact lookup-table path for stored integer pixels (used by the cache) -------------------
# A slice's HU are a per-pixel function of its stored 16-bit value, so the three windows of every
# possible value can be tabulated once per (signedness, slope, intercept) with window_rgb itself:
# the table is exact by construction, and a gather is several times faster than the arithmetic.
_LUTS: dict[tuple[bool, float, float, bool], np.ndarray] = {}


def window_lut(signed: bool, slope: float, intercept: float, bgr: bool = False) -> np.ndarray:
    """(65536, 3) uint8: window_rgb of the HU of every 16-bit stored value (index = value as uint16)."""
    key = (bool(signed), float(slope), float(intercept), bool(bgr))
    lut = _LUTS.get(key)
    if lut is None:
        values = np.arange(65536, dtype=np.uint16)
        if signed:
            values = values.view(np.int16)  # index i holds the int16 whose bits are i
        lut = window_rgb(hu_from_pixels(values.reshape(1, -1), slope, intercept), bgr=bgr)[0]
        if len(_LUTS) > 64:  # a study has one or two (slope, intercept) pairs: keep the cache small
            _LUTS.clear()
        _LUTS[key] = lut
    return lut


@numba.njit(cache=True, nogil=True)
def _gather_kernel(pixels: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:
    rows, cols = pixels.shape
    for i in range(rows):
        for j in range(cols):
            k = pixels[i, j]
            out[i, j, 0] = lut[k, 0]
            out[i, j, 1] = lut[k, 1]
            out[i, j, 2] = lut[k, 2]


def window_pixels(pixels: np.ndarray, slope: float, intercept: float, out: np.ndarray | None = None,
                  bgr: bool = False) -> np.ndarray:
    """``window_rgb(hu_from_pixels(pixels, slope, intercept))`` for 16-bit stored pixels, via a table.

    Bit-identical to the arithmetic path (tested); other dtypes fall back to it.
    """
    if pixels.ndim != 2:
        raise ValueError(f"window_pixels expects one 2-D slice, got shape {pixels.shape}")
    if pixels.dtype not in (np.int16, np.uint16):
        return window_rgb(hu_from_pixels(pixels, slope, intercept), out=out, bgr=bgr)
    if out is None:
        out = np.empty((*pixels.shape, 3), dtype=np.uint8)
    elif out.shape != (*pixels.shape, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 {(*pixels.shape, 3)}, got {out.dtype} {out.shape}")
    lut = window_lut(pixels.dtype == np.int16, slope, intercept, bgr)
    _gather_kernel(np.ascontiguousarray(pixels).view(np.uint16), lut, out)
    return out
