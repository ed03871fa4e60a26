"""pe.data.windows: the three RSPECT windows, exact values, numba kernel == float64 reference, LUT path."""

from __future__ import annotations

from pathlib import Path

import data_store
import numpy as np
import pytest

from pe.data.dicom import read_dataset, read_hu, read_pixels, rescale
from pe.data.windows import WINDOWS, window_pixels, window_rgb, window_rgb_reference

UNCR = Path(data_store.__file__).parent / "data" / "693_UNCR.dcm"


def test_windows_are_the_rspect_ones() -> None:
    assert WINDOWS == {"lung": (-600.0, 1500.0), "pe": (100.0, 700.0), "mediastinal": (40.0, 400.0)}


@pytest.mark.parametrize(
    "hu, rgb",
    [
        (-3024, (0, 0, 0)),  # outside the scan field: black everywhere
        (-1350, (0, 0, 0)),  # lung window floor (-600 - 1500/2)
        (-1000, (60, 0, 0)),  # air: 350/1500*255 = 59.5 -> 60 (half to even)
        (-600, (128, 0, 0)),  # lung centre: 127.5 -> 128
        (-250, (187, 0, 0)),  # PE window floor; 1100/1500*255 = 187 exactly
        (-160, (202, 33, 0)),  # mediastinal floor; lung 1190*0.17 = 202.3; PE 90/700*255 = 32.79
        (40, (236, 106, 128)),  # mediastinal centre; lung 1390*0.17 = 236.3; PE 290/700*255 = 105.64
        (100, (246, 128, 166)),  # PE centre 127.5 -> 128; mediastinal 260/400*255 = 165.75
        (150, (255, 146, 198)),  # lung ceiling; PE 400/700*255 = 145.71; med 310/400*255 = 197.63
        (240, (255, 178, 255)),  # mediastinal ceiling; PE 490/700*255 = 178.5 -> 178 (half to even)
        (450, (255, 255, 255)),  # PE ceiling
        (3000, (255, 255, 255)),
    ],
)
def test_known_values(hu: float, rgb: tuple[int, int, int]) -> None:
    img = window_rgb(np.full((2, 3), hu, dtype=np.float32))
    assert img.dtype == np.uint8 and img.shape == (2, 3, 3)
    assert (img == np.array(rgb, dtype=np.uint8)).all(), (hu, img[0, 0].tolist())
    assert np.array_equal(img, window_rgb_reference(np.full((2, 3), hu)))


def test_kernel_equals_float64_reference_everywhere() -> None:
    # every quarter HU over the CT range, ties included, plus a real slice
    hu = np.arange(-3100, 3100, 0.25, dtype=np.float32).reshape(-1, 200)
    assert np.array_equal(window_rgb(hu), window_rgb_reference(hu))
    real = read_hu(UNCR)
    assert np.array_equal(window_rgb(real), window_rgb_reference(real))
    # float64 input and a non-contiguous view give the same
    assert np.array_equal(window_rgb(real.astype(np.float64)[::2, ::3]), window_rgb_reference(real[::2, ::3]))


def test_bgr_and_buffer_reuse() -> None:
    hu = read_hu(UNCR)
    buf = np.empty((512, 512, 3), np.uint8)
    out = window_rgb(hu, out=buf, bgr=True)
    assert out is buf and np.array_equal(buf, window_rgb(hu)[..., ::-1])
    with pytest.raises(ValueError, match="out must be"):
        window_rgb(hu, out=np.empty((512, 512, 3), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        window_rgb(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("slope, intercept, dtype", [(1.0, -1024.0, np.int16), (1.0, -1024.0, np.uint16),
                                                     (0.5, -512.25, np.int16), (2.0, -3000.0, np.uint16)])
def test_lookup_table_path_is_bit_identical(slope: float, intercept: float, dtype: type) -> None:
    from pe.data.dicom import hu_from_pixels

    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    pixels = rng.integers(info.min, info.max, size=(256, 256), endpoint=True).astype(dtype)
    expected = window_rgb(hu_from_pixels(pixels, slope, intercept))
    assert np.array_equal(window_pixels(pixels, slope, intercept), expected)
    assert np.array_equal(window_pixels(pixels, slope, intercept, bgr=True), expected[..., ::-1])


def test_lookup_table_on_a_real_file() -> None:
    ds = read_dataset(UNCR)
    assert np.array_equal(window_pixels(read_pixels(ds), *rescale(ds)), window_rgb(read_hu(UNCR)))
