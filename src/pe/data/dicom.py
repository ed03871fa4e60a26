"""The one DICOM pixel reader of the project (cache, Kaggle kernel and tests use it).

``read_hu(path)`` returns one CT slice in Hounsfield units, ``pixel * RescaleSlope +
RescaleIntercept`` with the slope and intercept of *that* file (RSPECT.md: they vary per file).

Decoding, fastest first (speeds measured on this kind of machine, RSPECT.md "Practical notes"):
- uncompressed little-endian 16-bit: the pixel bytes are viewed with ``np.frombuffer`` (about twice
  as fast as pydicom's generic native decoder, identical values: tested);
- compressed syntaxes: pydicom's decoder with an explicit plugin order per syntax, because pydicom's
  default order is not the fastest one: RLE through pylibjpeg-rle (~620/s against ~90/s native),
  JPEG Lossless / JPEG-LS through GDCM (faster than pylibjpeg-libjpeg), JPEG 2000 through
  pylibjpeg-openjpeg or GDCM (about equal). When the preferred plugin fails on a file, the next one
  is tried; when none can decode it, :class:`DicomDecodeError` names the file and the syntax.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pydicom
import pydicom.config
from pydicom import uid as _uid
from pydicom.pixels import get_decoder

PathLike = str | os.PathLike[str]

# RSPECT's anonymised UIDs are 12-hex strings, not valid DICOM UI values: pydicom's validation of
# values on read would warn (and log) once per file and per UID. Reading only; writing still validates.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# Transfer syntaxes whose pixel bytes are stored raw, little-endian.
_NATIVE_LE = {_uid.ImplicitVRLittleEndian, _uid.ExplicitVRLittleEndian}

# Preferred decoding plugins per compressed syntax (first = fastest measured). Plugins that are
# not installed are skipped; syntaxes not listed use every available plugin in pydicom's order.
_PLUGIN_ORDER: dict[str, tuple[str, ...]] = {
    _uid.RLELossless: ("pylibjpeg", "gdcm", "pydicom"),
    _uid.JPEGLosslessSV1: ("gdcm", "pylibjpeg"),
    _uid.JPEGLossless: ("gdcm", "pylibjpeg"),
    _uid.JPEGLSLossless: ("gdcm", "pylibjpeg"),
    _uid.JPEGLSNearLossless: ("gdcm", "pylibjpeg"),
    _uid.JPEG2000Lossless: ("pylibjpeg", "gdcm", "pillow"),
    _uid.JPEG2000: ("pylibjpeg", "gdcm", "pillow"),
    _uid.JPEGBaseline8Bit: ("gdcm", "pylibjpeg", "pillow"),
    _uid.JPEGExtended12Bit: ("gdcm", "pylibjpeg", "pillow"),
}

# Header fields read_header returns (absent ones come back as None).
_HEADER_FIELDS = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns",
    "RescaleSlope", "RescaleIntercept", "BitsAllocated", "BitsStored", "PixelRepresentation",
    "PhotometricInterpretation", "SamplesPerPixel",
)


class DicomDecodeError(ValueError):
    """A file whose pixels no installed decoder could turn into an image."""

    def __init__(self, path: PathLike, syntax: str, reason: str) -> None:
        self.path = str(path)
        self.syntax = syntax
        self.reason = reason
        super().__init__(f"{path}: cannot decode pixels (transfer syntax {syntax}): {reason}")


def _syntax_name(ds: pydicom.Dataset) -> str:
    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsuid is None:
        return "unknown (no TransferSyntaxUID)"
    return f"{tsuid.name} [{tsuid}]" if tsuid.name != tsuid else str(tsuid)


def _plugins_for(tsuid: str) -> list[str]:
    """Installed decoding plugins for a compressed syntax, fastest first."""
    try:
        available = list(get_decoder(tsuid).available_plugins)
    except (NotImplementedError, ValueError):
        return []
    preferred = [p for p in _PLUGIN_ORDER.get(tsuid, ()) if p in available]
    return preferred + [p for p in available if p not in preferred]


def _native_pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """Raw pixels of an uncompressed 16-bit single-frame slice without copying, else None."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    if (
        ds.get("BitsAllocated") != 16
        or ds.get("SamplesPerPixel", 1) != 1
        or int(ds.get("NumberOfFrames", 1) or 1) != 1
    ):
        return None
    data = ds.get("PixelData")
    if data is None or len(data) < rows * cols * 2:
        return None
    # Only the bits pydicom would keep: BitsStored < 16 needs no masking for CT as written by
    # scanners (the unused high bits repeat the sign), which the equality test against pydicom checks.
    dtype = "<i2" if ds.get("PixelRepresentation", 0) == 1 else "<u2"
    return np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)


def read_pixels(ds: pydicom.Dataset, path: PathLike = "<dataset>") -> np.ndarray:
    """Stored pixel values (before rescale) of a single-frame monochrome slice."""
    if "PixelData" not in ds:
        raise DicomDecodeError(path, _syntax_name(ds), "no PixelData element")
    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsuid is None:
        raise DicomDecodeError(path, _syntax_name(ds), "no TransferSyntaxUID in the file meta")
    if tsuid in _NATIVE_LE:
        arr = _native_pixels(ds)
        if arr is not None:
            return arr
        return _pixel_array(ds, path, "")
    plugins = _plugins_for(tsuid)
    if not plugins:
        raise DicomDecodeError(path, _syntax_name(ds), "no installed decoder supports this syntax")
    errors = []
    for plugin in plugins:
        try:
            return _pixel_array(ds, path, plugin)
        except DicomDecodeError as e:
            errors.append(f"{plugin}: {e.reason}")
    raise DicomDecodeError(path, _syntax_name(ds), "; ".join(errors))


def _pixel_array(ds: pydicom.Dataset, path: PathLike, plugin: str) -> np.ndarray:
    try:
        ds.pixel_array_options(decoding_plugin=plugin)
        arr = ds.pixel_array
    except Exception as e:  # decoders raise anything from ValueError to RuntimeError
        raise DicomDecodeError(path, _syntax_name(ds), f"{type(e).__name__}: {e}") from e
    if arr.ndim != 2:
        raise DicomDecodeError(path, _syntax_name(ds), f"expected one 2-D frame, got shape {arr.shape}")
    return arr


def read_dataset(path: PathLike) -> pydicom.Dataset:
    """The parsed file; unreadable or truncated headers become :class:`DicomDecodeError`."""
    try:
        return pydicom.dcmread(path, force=True)
    except Exception as e:
        raise DicomDecodeError(path, "unknown (header unreadable)", f"{type(e).__name__}: {e}") from e


def rescale(ds: pydicom.Dataset) -> tuple[float, float]:
    """(slope, intercept) of one file; the DICOM defaults 1 and 0 when absent."""
    slope = ds.get("RescaleSlope", 1)
    intercept = ds.get("RescaleIntercept", 0)
    return float(slope if slope not in (None, "") else 1), float(intercept if intercept not in (None, "") else 0)


def hu_from_pixels(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """HU as float32: computed in float64 (exact for any slope) and rounded once to float32."""
    if slope == 1.0 and intercept == int(intercept):
        # The common CT case: integer arithmetic in float32 is exact (|HU| < 2**24).
        out = pixels.astype(np.float32)
        out += np.float32(intercept)
        return out
    return (pixels.astype(np.float64) * slope + intercept).astype(np.float32)


def read_hu(path: PathLike) -> np.ndarray:
    """One slice in Hounsfield units, float32 (rows, columns).

    Raises :class:`DicomDecodeError` (a ``ValueError``) naming the file and its transfer syntax
    when the header or the pixels cannot be read.
    """
    ds = read_dataset(path)
    pixels = read_pixels(ds, path)
    try:
        slope, intercept = rescale(ds)
    except (TypeError, ValueError) as e:
        raise DicomDecodeError(path, _syntax_name(ds), f"bad RescaleSlope/RescaleIntercept: {e}") from e
    return hu_from_pixels(pixels, slope, intercept)


def read_header(path: PathLike) -> dict[str, Any]:
    """A few header fields (no pixel data read), plus ``transfer_syntax`` (the UID string)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as e:
        raise DicomDecodeError(path, "unknown (header unreadable)", f"{type(e).__name__}: {e}") from e
    out: dict[str, Any] = {k: ds.get(k) for k in _HEADER_FIELDS}
    for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PhotometricInterpretation"):
        out[k] = None if out[k] is None else str(out[k])
    for k in ("RescaleSlope", "RescaleIntercept"):
        out[k] = None if out[k] in (None, "") else float(out[k])
    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    out["transfer_syntax"] = None if tsuid is None else str(tsuid)
    return out
