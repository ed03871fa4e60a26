"""A synthetic RSPECT look-alike: chest CT pulmonary angiograms drawn in Hounsfield units, written
as DICOM files in the Kaggle layout with train.csv / test.csv / sample_submission.csv.

Why a phantom: the real data (about 1 TB) cannot be shipped or downloaded here, yet every stage
must run on files that look to our code exactly like the competition's (RSPECT.md). So the
phantom reproduces the traps of the real data (ids, z order vs InstanceNumber, int16/uint16 with
varying intercepts, 12-bit BitsStored, compressed transfer syntaxes, multi-valued windows) and
gives every label a visual cause that a small CNN can learn:

- ``pe_present_on_image``: the slice intersects an embolus, a dark (~20-90 HU) filling defect inside
  a bright (~250-450 HU) contrast-filled pulmonary artery, spanning a run of consecutive slices;
- ``central_pe`` / ``rightsided_pe`` / ``leftsided_pe``: emboli in the pulmonary trunk / right / left
  pulmonary arteries and their lobar and segmental branches (patient right = image left);
- ``chronic_pe``: eccentric, wall-adherent defects, denser, some calcified; ``acute_and_chronic_pe``
  mixes them with acute central "polo-mint" defects; acute otherwise;
- ``rv_lv_ratio_gte_1``: an enlarged right ventricle (RV/LV diameter ratio >= 1);
- ``indeterminate``: poor contrast (``qa_contrast``) or motion blur with ghosting (``qa_motion``);
- ``flow_artifact`` and ``true_filling_defect_not_pe`` (informational): dimmed lower-lobe arteries,
  a defect in the descending aorta.

Files besides the Kaggle layout: ``train_boxes.csv`` (SOPInstanceUID, x, y, width, height: one row
per embolus per slice, original pixels), ``phantom_test_labels.csv`` / ``phantom_test_boxes.csv``
(the same truth for the test split, to score the demo's test predictions) and ``phantom_truth.csv``,
one row per study: ids, split, n_slices, n_positive_images, size, pixel/slice spacing, the lung
extent over all slices ``lung_x0, lung_y0, lung_x1, lung_y1`` (pixels, x1/y1 exclusive), exam kind,
indeterminate cause, drawn RV/LV ratio, emboli count and styles, InstanceNumber scheme, transfer
syntax, storage (dtype, intercept, BitsStored) and every exam and informational label.

Geometry is planned per study (in mm, from a study-specific random stream), then every slice is
drawn with OpenCV primitives on a float HU image, blurred slightly (partial volume) and given
CT-like noise from a pre-drawn noise texture. Everything comes from ``numpy.random.default_rng``
streams keyed by (seed, split, study): same seed, same bytes, whatever the number of workers.
"""

from __future__ import annotations

import functools
import io
import math
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom import config as dicom_config
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset, FileMetaDataset
from tqdm import tqdm

from pe import io as pe_io
from pe import rspect
from pe.ids import exam_row_id
from pe.synthetic.anatomy_truth import write_anatomy_truth
from pe.synthetic.phantom_draw import (
    _Canvas,
    render_slice,
)
from pe.synthetic.phantom_plan import (  # noqa: F401 (public names of the phantom, re-exported)
    BOX_COLUMNS,
    CT_IMAGE_STORAGE,
    JPEG_LOSSLESS,
    MARKER_FILE,
    P_POSITIVE,
    SHORTCUT_FILE,
    SHORTCUT_KINDS,
    SPLITS,
    TEST_BOXES_FILE,
    TEST_LABELS_FILE,
    TRUTH_FILE,
    UID_STYLES,
    Embolus,
    StudyPlan,
    Tube,
    make_uid,
    plan_split,
)

# Named phantom sizes (src/00_make_phantom.py --preset NAME; explicit flags override). "demo" is the
# phantom of make demo (src/run_pipeline.sh) and of bench/demo_cnn_trial.sh: 72 + 10 studies of 30-50
# slices at 512 px, 70 % PE-positive exams (enough positive slices for a CNN to learn from 36 studies).
PRESETS: dict[str, dict[str, float | int]] = {
    "demo": dict(train_studies=72, test_studies=10, size=512, min_slices=30, max_slices=50, positive_rate=0.7),
}


# ------------------------------------------------------------------------------------------------
# DICOM writing
# ------------------------------------------------------------------------------------------------
def _stored_range(plan: StudyPlan) -> tuple[int, int]:
    if plan.dtype == "uint16":
        return 0, 2**plan.bits_stored - 1
    return -(2 ** (plan.bits_stored - 1)), 2 ** (plan.bits_stored - 1) - 1


def hu_to_stored(plan: StudyPlan, hu: np.ndarray) -> np.ndarray:
    """Stored pixel values of a HU image for the study's representation (slope 1)."""
    lo, hi = _stored_range(plan)
    hu = np.clip(hu, -1024, 3071)
    if plan.pad_outside_fov:  # scanners store a padding value outside the reconstruction circle
        hu = np.where(_outside_fov(plan.size), np.float32(-2000.0), hu)
    return np.clip(np.rint(hu - plan.intercept), lo, hi).astype(plan.dtype)


@functools.cache
def _outside_fov(size: int) -> np.ndarray:
    yy, xx = np.ogrid[:size, :size]
    c = (size - 1) / 2
    return (yy - c) ** 2 + (xx - c) ** 2 > (size / 2) ** 2


def _base_dataset(plan: StudyPlan) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.Modality = "CT"
    ds.Manufacturer = "PE PHANTOM"
    ds.PatientID = make_uid(plan.seed, "kaggle", plan.split, plan.index, "patient")
    ds.PatientName = "Anonymous"
    # Type-2 elements present but empty, as in anonymised data; GDCM's writer would otherwise fill
    # StudyDate/StudyTime with the current time and break "same seed, same bytes".
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyInstanceUID = plan.study
    ds.SeriesInstanceUID = plan.series
    ds.FrameOfReferenceUID = make_uid(plan.seed, "dicom", plan.split, plan.index, "frame")
    ds.StudyID = ""
    ds.SeriesNumber = 1 + plan.index % 7
    ds.KVP = "120" if plan.index % 3 else "100"
    ds.SliceThickness = f"{plan.slice_thickness:g}"
    ds.PatientPosition = "HFS" if plan.index % 5 else "FFS"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = plan.size
    ds.Columns = plan.size
    ds.PixelSpacing = [f"{plan.pixel_spacing:.6g}", f"{plan.pixel_spacing:.6g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = plan.bits_stored
    ds.HighBit = plan.bits_stored - 1
    ds.PixelRepresentation = 1 if plan.dtype == "int16" else 0
    if plan.multi_window:
        ds.WindowCenter = ["40", "-600"]
        ds.WindowWidth = ["400", "1500"]
    else:
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
    ds.RescaleIntercept = f"{plan.intercept:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


_NATIVE = (str(dicom_uid.ExplicitVRLittleEndian), str(dicom_uid.ImplicitVRLittleEndian))


def _encode(ds: Dataset, plan: StudyPlan, stored: np.ndarray, compress: bool, scratch: Path) -> bytes:
    """The file bytes of one slice in the study's transfer syntax (uncompressed if not ``compress``)."""
    syntax = plan.transfer_syntax if compress or plan.transfer_syntax in _NATIVE else _NATIVE[0]
    if syntax in _NATIVE or syntax == JPEG_LOSSLESS:
        ds.file_meta.TransferSyntaxUID = _NATIVE[0] if syntax == JPEG_LOSSLESS else syntax
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
    else:
        # generate_instance_uid=False: pydicom 3 would otherwise give the file a new SOPInstanceUID
        # and break the id <-> file <-> train.csv link (RSPECT.md, practical notes).
        kw = {"encoding_plugin": "pylibjpeg"} if syntax == dicom_uid.RLELossless else {}
        ds.compress(syntax, stored, generate_instance_uid=False, **kw)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    if syntax == JPEG_LOSSLESS:
        data = _gdcm_jpeg_lossless(data, scratch)
    return data


def _gdcm_jpeg_lossless(data: bytes, scratch: Path) -> bytes:
    """Re-encode an uncompressed file as JPEG Lossless SV1 with GDCM (pydicom 3.0 has no encoder
    for it; the real RSPECT compressed files are of this kind, decoded by GDCM or pylibjpeg)."""
    import gdcm  # imported late: it runs `import dl` (RSPECT.md), and only this path needs it

    src, dst = scratch / "in.dcm", scratch / "out.dcm"
    src.write_bytes(data)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    ok = reader.Read()
    if ok:
        change.SetInput(reader.GetImage())
        ok = change.Change()
    if ok:
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        ok = writer.Write()
    if not ok:
        raise RuntimeError(f"GDCM could not write JPEG Lossless for {src}")
    out = dst.read_bytes()
    src.unlink()
    dst.unlink()
    return out


@dataclass
class StudyResult:
    rows: list[tuple]  # train.csv rows (TRAIN_COLUMNS order), in file-writing order
    boxes: list[tuple]  # (SOPInstanceUID, x, y, width, height)
    lung_box: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (exclusive) over all slices
    n_positive: int
    shortcut: list[tuple] = field(default_factory=list)  # (SOPInstanceUID, x, y, radius) in pixels


def _shortcut_slices(plan: StudyPlan, positives: set[int]) -> set[int]:
    """Positive slices that get the shortcut: each with probability ``shortcut_rate``, train split
    only, from a stream of its own (rate 0 draws nothing: the phantom stays byte-identical)."""
    if plan.shortcut_rate <= 0 or plan.split != "train":
        return set()
    srng = np.random.default_rng([plan.seed, SPLITS.index(plan.split), plan.index, 2])
    return {k for k in sorted(positives) if srng.random() < plan.shortcut_rate}


def _draw_shortcut(plan: StudyPlan, hu: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``hu`` with the shortcut added in the anterior left chest wall (subcutaneous fat, 50° above
    the patient's left-right axis), noise kept: a bright disc (+1400 HU, "marker") or a disc of
    vertical bright stripes ("stripes"). Returns the image and (x, y, radius) in pixels."""
    b = plan.body
    cv = _Canvas(plan.size, plan.pixel_spacing, b["cy"])
    ang = math.radians(-50.0)
    x, y = (b["a"] - b["fat"] / 2) * math.cos(ang), (b["b"] - b["fat"] / 2) * math.sin(ang)
    r = max(0.45 * b["fat"], 4.0)
    layer = np.zeros(hu.shape, np.float32)
    cv.circle(x, y, r, 1.0, img=layer)
    if plan.shortcut_kind == "stripes":
        layer *= (np.arange(plan.size)[None, :] // max(1, round(plan.size / 170)) % 2).astype(np.float32)
    u, v = cv.px(x, y)
    return hu + 1400.0 * layer, (int(round(u)), int(round(v)), int(round(r * cv.k)))


def build_study(plan: StudyPlan, out: Path, compress: bool = True) -> StudyResult:
    """Render and write every slice of one study; return its label rows, boxes and lung extent."""
    rng = np.random.default_rng([plan.seed, SPLITS.index(plan.split), plan.index, 1])
    folder = Path(out) / plan.split / plan.study / plan.series
    folder.mkdir(parents=True, exist_ok=True)
    positives = plan.positive_slices()
    marked, shortcut = _shortcut_slices(plan, positives), []
    exam_cols = [c for c in rspect.TRAIN_COLUMNS if c not in (*rspect.ID_COLUMNS, rspect.IMAGE_LABEL)]
    exam = [plan.labels[c] for c in exam_cols]
    rows: list[tuple] = []
    boxes: list[tuple] = []
    lx0 = ly0 = 10**9
    lx1 = ly1 = -1
    # The header writer needs the hex ids in UI elements as the real data has them: pydicom's
    # value validation would warn (or refuse) on those, so it is off while writing.
    scratch = Path(out) / ".scratch" / f"{plan.split}_{plan.index}"
    scratch.mkdir(parents=True, exist_ok=True)
    with dicom_config.disable_value_validation():
        ds = _base_dataset(plan)
        for k in range(plan.n):
            hu, bx, lung = render_slice(plan, k, rng)
            if k in marked:
                hu, where = _draw_shortcut(plan, hu)
                shortcut.append((plan.sops[k], *where))
            if lung is not None:
                ys, xs = np.nonzero(lung.any(axis=1))[0], np.nonzero(lung.any(axis=0))[0]
                if len(ys):
                    ly0, ly1 = min(ly0, int(ys[0])), max(ly1, int(ys[-1]) + 1)
                    lx0, lx1 = min(lx0, int(xs[0])), max(lx1, int(xs[-1]) + 1)
            sop = plan.sops[k]
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.InstanceNumber = plan.instance_numbers[k]
            x0 = -(plan.size - 1) / 2 * plan.pixel_spacing
            ds.ImagePositionPatient = [f"{x0:.3f}", f"{x0 - plan.body['cy']:.3f}", f"{plan.z[k]:.3f}"]
            if plan.write_slice_location:
                ds.SliceLocation = f"{plan.z[k]:.3f}"
            data = _encode(ds, plan, hu_to_stored(plan, hu), compress, scratch)
            pe_io.write_bytes_atomic(folder / f"{sop}.dcm", data)
            rows.append((plan.study, plan.series, sop, int(k in positives), *exam))
            boxes.extend((sop, *b) for b in bx)
    shutil.rmtree(scratch, ignore_errors=True)
    order = np.argsort(plan.sops, kind="stable")  # csv rows in an order that says nothing about z
    lung_box = (lx0, ly0, lx1, ly1) if lx1 >= 0 else None
    return StudyResult([rows[i] for i in order], boxes, lung_box, len(positives), shortcut)


def _build_study_job(args: tuple[StudyPlan, str, bool]) -> StudyResult:
    plan, out, compress = args
    return build_study(plan, Path(out), compress)


def _results(jobs: list[tuple[StudyPlan, str, bool]], workers: int) -> Iterator[StudyResult]:
    if workers <= 1:
        yield from map(_build_study_job, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_build_study_job, jobs, chunksize=1)


def _truth_row(plan: StudyPlan, res: StudyResult) -> dict:
    lb = res.lung_box or (-1, -1, -1, -1)
    return {
        "StudyInstanceUID": plan.study, "SeriesInstanceUID": plan.series, "split": plan.split,
        "n_slices": plan.n, "n_positive_images": res.n_positive, "size": plan.size,
        "pixel_spacing": plan.pixel_spacing, "slice_spacing": plan.slice_spacing,
        "lung_x0": lb[0], "lung_y0": lb[1], "lung_x1": lb[2], "lung_y1": lb[3],
        "exam_kind": plan.exam_kind, "indeterminate_cause": "contrast" if plan.labels["qa_contrast"] else
        "motion" if plan.motion else "", "rv_lv_ratio": round(plan.heart["ratio"], 4),
        "n_emboli": sum(e.style != "aortic" for e in plan.emboli),
        "embolus_styles": ";".join(sorted({e.style for e in plan.emboli})),
        "instance_order": plan.instance_order, "transfer_syntax": plan.transfer_syntax, "dtype": plan.dtype,
        "rescale_intercept": plan.intercept, "bits_stored": plan.bits_stored,
        **{c: plan.labels[c] for c in rspect.EXAM_LABELS + rspect.INFO_LABELS},
    }


def _prepare_out(out: Path, params: dict) -> None:
    """Refuse to overwrite anything but an earlier phantom (never real data); clear an earlier one."""
    existing = [out / s for s in SPLITS if (out / s).exists()]
    if existing and not ((out / TRUTH_FILE).exists() or (out / MARKER_FILE).exists()):
        raise FileExistsError(f"{out}: holds {existing[0].name}/ but no {TRUTH_FILE}; not a phantom, "
                              "refusing to overwrite")
    pe_io.write_json_atomic(out / MARKER_FILE, params)
    for p in existing:
        shutil.rmtree(p)
    (out / TRUTH_FILE).unlink(missing_ok=True)


def make_phantom(out: Path | str, train_studies: int, test_studies: int, seed: int, size: int = 512,
                 min_slices: int = 40, max_slices: int = 100, workers: int = 1, uid_style: str = "kaggle",
                 compress: bool = True, positive_rate: float = P_POSITIVE, shortcut_rate: float = 0.0,
                 shortcut_kind: str = "marker", embolus_scale: float = 1.0) -> None:
    """Write a synthetic RSPECT look-alike to ``out`` (layout of CONTRACTS.md row 00).

    ``shortcut_rate`` > 0 plants a shortcut (``shortcut_kind``: see :func:`_draw_shortcut`) on that share
    of the PE-positive slices of the train split, never in test, and lists them in SHORTCUT_FILE; 0
    (the default) leaves every output byte-identical to a phantom made without the option.

    ``embolus_scale`` in (0, 2] scales every PE embolus (defect radius and run of slices; see
    ``phantom_scale.scale_emboli``): < 1 for a harder phantom, > 1 for larger emboli (not an easier
    phantom for the demo CNN: a defect filling most of its vessel hides the bright rim; README, demo
    section); 1 (the default) changes no byte.

    ``uid_style``: ``kaggle`` (12-hex ids like the real data) or ``dicom`` (2.25.* UIDs).
    ``compress=False`` writes every file uncompressed with otherwise identical content (tests use it
    to check lossless decoding)."""
    if uid_style not in UID_STYLES:
        raise ValueError(f"uid_style must be one of {UID_STYLES}, got {uid_style!r}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if not 0.0 <= shortcut_rate <= 1.0 or shortcut_kind not in SHORTCUT_KINDS:
        raise ValueError(f"shortcut_rate must be in [0, 1] and shortcut_kind one of {SHORTCUT_KINDS}, "
                         f"got {shortcut_rate}, {shortcut_kind!r}")
    if not 0.0 < embolus_scale <= 2.0:
        raise ValueError(f"embolus_scale must be in (0, 2], got {embolus_scale}")
    # options recorded in the marker only when used, so a phantom made without them keeps its bytes
    options: dict = dict(shortcut_rate=shortcut_rate, shortcut_kind=shortcut_kind) if shortcut_rate > 0 else {}
    if embolus_scale != 1.0:
        options["embolus_scale"] = embolus_scale
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _prepare_out(out, dict(train_studies=train_studies, test_studies=test_studies, seed=seed, size=size,
                           min_slices=min_slices, max_slices=max_slices, uid_style=uid_style, compress=compress,
                           positive_rate=positive_rate, **options))
    plans = {s: plan_split(s, n, seed, size, min_slices, max_slices, uid_style, positive_rate, embolus_scale)
             for s, n in (("train", train_studies), ("test", test_studies))}
    for p in plans["train"]:
        p.shortcut_rate, p.shortcut_kind = shortcut_rate, shortcut_kind
    (out / SHORTCUT_FILE).unlink(missing_ok=True)
    jobs = [(p, str(out), compress) for s in SPLITS for p in plans[s]]
    workers = max(1, min(workers, len(jobs)))
    results = list(tqdm(_results(jobs, workers), total=len(jobs), desc="phantom studies", unit="study",
                        disable=len(jobs) < 20))
    by_split: dict[str, list[tuple[StudyPlan, StudyResult]]] = {s: [] for s in SPLITS}
    for (plan, _, _), res in zip(jobs, results, strict=True):
        by_split[plan.split].append((plan, res))

    train_rows = [r for _, res in by_split["train"] for r in res.rows]
    train = pd.DataFrame(train_rows, columns=list(rspect.TRAIN_COLUMNS))
    pe_io.write_csv_atomic(train, out / "train.csv")
    test_full = pd.DataFrame([r for _, res in by_split["test"] for r in res.rows], columns=list(rspect.TRAIN_COLUMNS))
    pe_io.write_csv_atomic(test_full[list(rspect.TEST_COLUMNS)], out / "test.csv")
    pe_io.write_csv_atomic(test_full, out / TEST_LABELS_FILE)
    sub_ids = [exam_row_id(p.study, lab) for p, _ in by_split["test"] for lab in rspect.EXAM_LABELS]
    sub_ids += test_full[rspect.SOP].tolist()
    pe_io.write_csv_atomic(pd.DataFrame({"id": sub_ids, "label": 0.5}), out / "sample_submission.csv")
    for split, name in (("train", "train_boxes.csv"), ("test", TEST_BOXES_FILE)):
        boxes = [b for _, res in by_split[split] for b in res.boxes]
        pe_io.write_csv_atomic(pd.DataFrame(boxes, columns=list(BOX_COLUMNS)), out / name)
    shutil.rmtree(out / ".scratch", ignore_errors=True)
    if shortcut_rate > 0:
        rows = [m for s in SPLITS for _, r in by_split[s] for m in r.shortcut]
        pe_io.write_csv_atomic(pd.DataFrame(rows, columns=["SOPInstanceUID", "x", "y", "radius"]), out / SHORTCUT_FILE)
    truth = pd.DataFrame([_truth_row(p, r) for s in SPLITS for p, r in by_split[s]])
    pe_io.write_csv_atomic(truth, out / TRUTH_FILE)
    # Anatomical truth (lung/heart/ROI boxes per slice, landmarks): extra files, same geometry.
    write_anatomy_truth(out, [p for s in SPLITS for p in plans[s]], workers)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
