"""pe.data.dicom.read_hu on real CT files from pydicom-data, compressed copies and broken files."""

from __future__ import annotations

from pathlib import Path

import data_store
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, RLELossless

from pe.data.dicom import DicomDecodeError, read_header, read_hu

DATA = Path(data_store.__file__).parent / "data"
UNCR = DATA / "693_UNCR.dcm"  # real 512² CT slice, uncompressed
J2KR = DATA / "693_J2KR.dcm"  # the same slice, JPEG 2000 lossless
JPEG_LL = DATA / "bad_sequence.dcm"  # another CT slice, JPEG Lossless SV1, 12-bit unsigned


def _reference_hu(path: Path, plugin: str = "") -> np.ndarray:
    ds = pydicom.dcmread(path)
    if plugin:
        ds.pixel_array_options(decoding_plugin=plugin)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_uncompressed_fast_path_equals_pydicom() -> None:
    hu = read_hu(UNCR)
    assert hu.dtype == np.float32 and hu.shape == (512, 512)
    assert np.array_equal(hu, _reference_hu(UNCR))
    assert -1024 <= np.median(hu) <= 100  # a chest slice: air and soft tissue, not raw stored values


def test_jpeg2000_copy_gives_identical_hu() -> None:
    assert pydicom.dcmread(J2KR, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(read_hu(J2KR), read_hu(UNCR))


def test_jpeg_lossless_decodes_sensibly_with_both_decoders() -> None:
    hu = read_hu(JPEG_LL)
    assert np.array_equal(hu, _reference_hu(JPEG_LL, "gdcm"))
    assert np.array_equal(hu, _reference_hu(JPEG_LL, "pylibjpeg"))
    assert hu.min() >= -1024 and hu.max() <= 3071
    # a zoomed spine slice: mostly soft tissue, air below the back, some bone
    assert (np.abs(hu - 40) < 100).mean() > 0.5 and (hu < -900).mean() > 0.05 and (hu > 300).mean() > 0.01


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_copies_give_identical_hu(syntax: str, tmp_path: Path) -> None:
    ds = pydicom.dcmread(UNCR)
    sop = ds.SOPInstanceUID
    ds.compress(syntax, generate_instance_uid=False)  # keep the SOPInstanceUID (RSPECT.md)
    p = tmp_path / "copy.dcm"
    ds.save_as(p)
    assert read_header(p)["transfer_syntax"] == syntax and read_header(p)["SOPInstanceUID"] == sop
    assert np.array_equal(read_hu(p), read_hu(UNCR))


def test_rescale_is_per_file(tmp_path: Path) -> None:
    ds = pydicom.dcmread(UNCR)
    ds.RescaleIntercept = -1000
    ds.save_as(tmp_path / "a.dcm")
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -512.25
    ds.save_as(tmp_path / "b.dcm")
    base = read_hu(UNCR).astype(np.float64) + 1024  # stored values
    assert np.array_equal(read_hu(tmp_path / "a.dcm"), (base - 1000).astype(np.float32))
    assert np.array_equal(read_hu(tmp_path / "b.dcm"), (base * 0.5 - 512.25).astype(np.float32))


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_errors_name_the_file_and_the_syntax(tmp_path: Path) -> None:
    trunc = tmp_path / "truncated.dcm"
    trunc.write_bytes(J2KR.read_bytes()[:20000])
    with pytest.raises(DicomDecodeError, match=r"truncated\.dcm.*JPEG 2000"):
        read_hu(trunc)
    ds = pydicom.dcmread(UNCR)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # a video syntax: no installed decoder
    ds.PixelData = encapsulate([b"\x00" * 64])
    unknown = tmp_path / "mpeg2.dcm"
    ds.save_as(unknown)
    with pytest.raises(DicomDecodeError, match=r"mpeg2\.dcm.*MPEG2.*no installed decoder"):
        read_hu(unknown)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"hello" * 100)
    with pytest.raises(ValueError, match=r"junk\.dcm"):  # DicomDecodeError is a ValueError
        read_hu(junk)


def test_read_header() -> None:
    h = read_header(UNCR)
    assert h["Rows"] == 512 and h["transfer_syntax"] == "1.2.840.10008.1.2.1"
    assert h["RescaleIntercept"] == -1024.0 and isinstance(h["RescaleSlope"], float)


def test_fastest_decoder_is_tried_first() -> None:
    from pydicom.uid import JPEGLosslessSV1

    from pe.data.dicom import _plugins_for

    assert _plugins_for(RLELossless)[0] == "pylibjpeg"  # pylibjpeg-rle: ~6x pydicom's native RLE
    assert _plugins_for(JPEGLosslessSV1)[0] == "gdcm"
    assert _plugins_for(MPEG2MPML) == []


def test_phantom_compressed_files_equal_their_uncompressed_twins(tmp_path: Path) -> None:
    """Every syntax the phantom writes (JPEG Lossless by GDCM, RLE, JPEG 2000, implicit VR) decodes to
    exactly the HU of the same phantom written uncompressed."""
    import pandas as pd

    from pe.synthetic.phantom import make_phantom

    kw = dict(train_studies=6, test_studies=0, seed=5, size=64, min_slices=4, max_slices=5)
    make_phantom(tmp_path / "c", **kw)
    make_phantom(tmp_path / "u", compress=False, **kw)
    files = sorted((tmp_path / "c" / "train").rglob("*.dcm"))
    syntaxes = {read_header(p)["transfer_syntax"] for p in files}
    assert {RLELossless, JPEG2000Lossless, "1.2.840.10008.1.2.4.70"} <= syntaxes, syntaxes
    for p in files:
        twin = tmp_path / "u" / p.relative_to(tmp_path / "c")
        assert read_header(twin)["transfer_syntax"] in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
        assert np.array_equal(read_hu(p), read_hu(twin)), p
    assert pd.read_csv(tmp_path / "c" / "train.csv").shape[0] == len(files)
