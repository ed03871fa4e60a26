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
import hashlib
import io
import math
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
from pydicom import config as dicom_config
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset, FileMetaDataset
from tqdm import tqdm

from pe import io as pe_io
from pe import rspect

SPLITS: tuple[str, ...] = ("train", "test")
TRUTH_FILE = "phantom_truth.csv"
TEST_LABELS_FILE = "phantom_test_labels.csv"  # test.csv with the labels (train.csv layout)
TEST_BOXES_FILE = "phantom_test_boxes.csv"
BOX_COLUMNS: tuple[str, ...] = ("SOPInstanceUID", "x", "y", "width", "height")

# Exam-level prevalences (RSPECT train set, papers/suman2021_* table 1: 1878 / 5824 positive).
P_POSITIVE = 0.32
P_INDETERMINATE = 0.02
# Among positive exams (same table): rv/lv >= 1 754/1878, right 1486/1878, left 1242/1878,
# central 318/1878, chronic 220/1878, acute and chronic 116/1878.
P_RV_LV_GTE_1 = 0.40
P_RIGHT = 0.80
P_LEFT = 0.65
P_CENTRAL = 0.17
P_CHRONIC = 0.12
P_ACUTE_AND_CHRONIC = 0.06

# Transfer syntaxes: shares of studies (at least one study each when a split has >= 4 studies).
# JPEG Lossless (.4.70) has no encoder in pydicom 3.0; RLE and JPEG 2000 Lossless exercise the
# pylibjpeg / GDCM decoding path.
SHARE_RLE = 0.15
SHARE_JPEG_LOSSLESS = 0.10
SHARE_IMPLICIT = 0.10
# JPEG 2000 encodes at ~10 slices/s: one study per split (the one with the fewest slices).
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"  # JPEG Lossless SV1, written through GDCM

CT_IMAGE_STORAGE = dicom_uid.CTImageStorage
UID_STYLES = ("kaggle", "dicom")
_NUMERIC = re.compile(r"[0-9]*(e[0-9]*)?")


# ------------------------------------------------------------------------------------------------
# ids
# ------------------------------------------------------------------------------------------------
def make_uid(seed: int, uid_style: str, *parts: object) -> str:
    """A deterministic id from the seed and a path of parts.

    ``kaggle``: 12 lowercase hex characters like the anonymised RSPECT ids; ``dicom``: a valid DICOM
    UID under the ``2.25`` root (a 128-bit integer, as for UUID-derived UIDs)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    if uid_style == "kaggle":
        uid = digest.hex()[:12]
        # Ids such as "123456789012" or "12e456789012" would be read back as numbers by a careless
        # pd.read_csv; real ids can be like that too, but the demo should not fail on it by chance.
        while _NUMERIC.fullmatch(uid):
            digest = hashlib.sha256(digest).digest()
            uid = digest.hex()[:12]
        return uid
    if uid_style == "dicom":
        return "2.25." + str(int.from_bytes(digest[:16], "big") or 1)
    raise ValueError(f"uid_style must be one of {UID_STYLES}, got {uid_style!r}")


# ------------------------------------------------------------------------------------------------
# study plan: everything about a study decided up front (cheap, in the parent process)
# ------------------------------------------------------------------------------------------------
@dataclass
class Tube:
    """A vessel piece visible for t in [t0, t1] (t: 0 = lung apex, 1 = below the lung bases).

    ``disk`` tubes run along z: their cross-section is a disk moving from p0 (at t0) to p1 (at t1)
    with a radius from r0 to r1. ``capsule`` tubes run in-plane (the left/right pulmonary arteries):
    a thick segment p0-p1 of radius r0 on every slice of their t-range."""

    name: str
    side: str  # central | right | left | none
    level: str  # trunk | main | lobar | segmental | small | vein | aorta
    kind: str  # disk | capsule
    t0: float
    t1: float
    p0: tuple[float, float]
    p1: tuple[float, float]
    r0: float
    r1: float
    hu: float
    masked: bool = False  # drawn only inside the lungs (small peripheral vessels)

    def at(self, t: float) -> tuple[float, float, float]:
        """Centre (x, y) and radius in mm at t (disk tubes)."""
        a = 0.0 if self.t1 == self.t0 else (t - self.t0) / (self.t1 - self.t0)
        return (self.p0[0] + a * (self.p1[0] - self.p0[0]), self.p0[1] + a * (self.p1[1] - self.p0[1]),
                self.r0 + a * (self.r1 - self.r0))


@dataclass
class Embolus:
    tube: int  # index into StudyPlan.tubes
    slices: list[int]  # anatomical slice indices (apex -> base), consecutive
    style: str  # acute | chronic | aortic (true filling defect, not PE)
    frac: float  # defect radius / vessel radius
    angle: float  # wall side of an eccentric defect (radians)
    along: tuple[float, float]  # capsule hosts: part of the segment covered (fractions)
    calcified: bool
    hu: float = 40.0  # acute clots ~20-55 HU; chronic, organised ones denser (~65-90 HU)


@dataclass
class StudyPlan:
    split: str
    index: int
    seed: int
    size: int
    study: str
    series: str
    sops: list[str]  # per anatomical slice (apex -> base)
    t: np.ndarray  # per anatomical slice
    z: np.ndarray  # ImagePositionPatient z per anatomical slice (apex = highest z)
    instance_numbers: list[int]
    instance_order: str
    pixel_spacing: float
    slice_spacing: float
    slice_thickness: float
    dtype: str  # int16 | uint16
    intercept: float
    bits_stored: int
    pad_outside_fov: bool
    transfer_syntax: str
    multi_window: bool
    write_slice_location: bool
    body: dict[str, float]
    heart: dict[str, float]
    contrast: dict[str, float]
    noise_sigma: float
    tubes: list[Tube]
    emboli: list[Embolus]
    motion: bool
    flow_artifact: bool
    exam_kind: str  # positive | negative | indeterminate
    labels: dict[str, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.sops)

    def positive_slices(self) -> set[int]:
        return {k for e in self.emboli if e.style != "aortic" for k in e.slices}


def _interp(t: float, knots: tuple[float, ...], values: tuple[float, ...]) -> float:
    return float(np.interp(t, knots, values))


# Lung size profile along z: small apices, widest at mid-chest, vanishing below the bases.
_LUNG_T = (0.0, 0.12, 0.5, 0.72, 0.88, 0.97, 1.0)
_LUNG_S = (0.30, 0.70, 1.0, 0.97, 0.72, 0.25, 0.0)
# Heart size profile: from the pulmonary valve level down to the apex of the heart.
_HEART_T = (0.48, 0.56, 0.7, 0.84, 0.93)
_HEART_S = (0.0, 0.75, 1.0, 0.8, 0.0)


def _lung_ellipse(plan: StudyPlan, side: str, t: float) -> tuple[float, float, float, float] | None:
    """(cx, cy, ax, ay) of a lung in mm at t, or None above/below it."""
    s = _interp(t, _LUNG_T, _LUNG_S)
    if s < 0.08:
        return None
    b = plan.body
    a_w, b_h = b["a"] - b["fat"], b["b"] - b["fat"]
    sign = -1.0 if side == "right" else 1.0  # patient right = image left
    cx = sign * 0.50 * a_w
    ax = 0.36 * a_w * s
    cy = 0.08 * b_h + 0.10 * b_h * max(0.0, t - 0.7) / 0.3  # bases recede posteriorly
    ay = 0.74 * b_h * (0.55 + 0.45 * s)
    if side == "left":
        hs = _interp(t, _HEART_T, _HEART_S)
        cx += 0.08 * a_w * hs  # the heart pushes the left lung laterally
        ax *= 1.0 - 0.25 * hs
    if side == "right" and t > 0.82:
        ay *= 1.0 - 0.4 * (t - 0.82) / 0.18  # the liver dome rises into the right base
    return cx, cy, ax, ay


def _point_in_lung(plan: StudyPlan, side: str, t: float, rng: np.random.Generator,
                   rmin: float, rmax: float) -> tuple[float, float]:
    e = _lung_ellipse(plan, side, t)
    if e is None:
        e = _lung_ellipse(plan, side, 0.5)
    assert e is not None
    cx, cy, ax, ay = e
    ang = rng.uniform(0, 2 * math.pi)
    rad = math.sqrt(rng.uniform(rmin**2, rmax**2))
    return cx + rad * ax * math.cos(ang), cy + rad * ay * math.sin(ang)


def _plan_vessels(plan: StudyPlan, rng: np.random.Generator) -> list[Tube]:
    g = plan.body["g"]  # body scale (1 = average adult)
    c = plan.contrast
    pa, ao = c["pa"], c["aorta"]
    tubes: list[Tube] = []
    # Pulmonary trunk: from the RV outflow tract (t ~ 0.53) up to the bifurcation (t ~ 0.36).
    tubes.append(Tube("trunk", "central", "trunk", "disk", 0.36, 0.53, (18 * g, -30 * g), (24 * g, -44 * g),
                      13.5 * g, 14.5 * g, pa))
    # Main right / left pulmonary arteries, in-plane at the bifurcation (RPA passes behind the aorta).
    hil_r = (-46 * g, -2 * g)
    hil_l = (50 * g, 2 * g)
    tubes.append(Tube("rpa", "right", "main", "capsule", 0.36, 0.43, (12 * g, -26 * g), hil_r, 9.5 * g, 9.5 * g, pa))
    tubes.append(Tube("lpa", "left", "main", "capsule", 0.33, 0.40, (22 * g, -32 * g), hil_l, 9.5 * g, 9.5 * g, pa))
    # Lobar and segmental arteries: disks moving from the hilum into the lung along z.
    for side, hil, t_h in (("right", hil_r, 0.42), ("left", hil_l, 0.39)):
        lobes = [("up", t_h - rng.uniform(0.22, 0.3)), ("mid", t_h + rng.uniform(0.18, 0.25)),
                 ("low", t_h + rng.uniform(0.38, 0.48))]
        if side == "left":
            lobes = [lobes[0], lobes[2]]
        for j, (lobe, t_end) in enumerate(lobes):
            end = _point_in_lung(plan, side, t_end, rng, 0.35, 0.6)
            t0, t1 = sorted((t_h, t_end))
            p0, p1 = (hil, end) if t_end > t_h else (end, hil)
            r_h, r_e = rng.uniform(7.0, 9.0) * g, rng.uniform(4.5, 5.5) * g
            r0, r1 = (r_h, r_e) if t_end > t_h else (r_e, r_h)
            tubes.append(Tube(f"{side}_lobar{j}_{lobe}", side, "lobar", "disk", t0, t1, p0, p1, r0, r1, pa))
            # Segmental branches leave the lobar artery part-way and run outward.
            for s in range(2):
                a = rng.uniform(0.3, 0.7)
                t_b = t_h + a * (t_end - t_h)
                pb = (hil[0] + a * (end[0] - hil[0]), hil[1] + a * (end[1] - hil[1]))
                t_e = float(np.clip(t_b + np.sign(t_end - t_h) * rng.uniform(0.12, 0.22), 0.03, 0.93))
                pe_ = _point_in_lung(plan, side, t_e, rng, 0.55, 0.8)
                q0, q1 = (pb, pe_) if t_e > t_b else (pe_, pb)
                rb, re_ = rng.uniform(3.5, 4.5) * g, rng.uniform(2.0, 2.8) * g
                u0, u1 = (rb, re_) if t_e > t_b else (re_, rb)
                tubes.append(Tube(f"{side}_seg{j}{s}", side, "segmental", "disk", min(t_b, t_e), max(t_b, t_e),
                                  q0, q1, u0, u1, pa))
        # Small peripheral arteries and veins: texture only, never hosts.
        for s in range(30):
            ta = rng.uniform(0.02, 0.9)
            tb = ta + rng.uniform(0.06, 0.18)
            p0 = _point_in_lung(plan, side, ta, rng, 0.1, 0.95)
            p1 = _point_in_lung(plan, side, tb, rng, 0.1, 0.95)
            vein = s % 3 == 0
            tubes.append(Tube(f"{side}_small{s}", "none", "vein" if vein else "small", "disk", ta, tb, p0, p1,
                              rng.uniform(1.0, 2.2) * g, rng.uniform(0.8, 1.6) * g,
                              c["vein"] if vein else pa * rng.uniform(0.7, 0.95), masked=True))
    # Aorta: arch, ascending and descending; less enhanced than the pulmonary arteries in CTPA.
    tubes.append(Tube("aorta_arch", "none", "aorta", "capsule", 0.22, 0.29, (-14 * g, -36 * g), (18 * g, 46 * g),
                      12 * g, 12 * g, ao))
    tubes.append(Tube("aorta_asc", "none", "aorta", "disk", 0.27, 0.56, (-14 * g, -36 * g), (-10 * g, -34 * g),
                      14 * g, 15 * g, ao))
    tubes.append(Tube("aorta_desc", "none", "aorta", "disk", 0.23, 1.05, (18 * g, 46 * g), (8 * g, 52 * g),
                      12 * g, 11 * g, ao))
    return tubes


def _host_slices(plan: StudyPlan, tube: Tube) -> list[int]:
    return [k for k in range(plan.n) if tube.t0 <= plan.t[k] <= tube.t1]


def _plan_emboli(plan: StudyPlan, rng: np.random.Generator, sides: dict[str, bool], chronicity: str) -> None:
    """Place emboli so that the location flags hold, each on >= 1 slice of its host vessel."""
    by_level: dict[tuple[str, str], list[int]] = {}
    for i, tb in enumerate(plan.tubes):
        by_level.setdefault((tb.side, tb.level), []).append(i)
    emboli: list[Embolus] = []
    for side in ("central", "right", "left"):
        if not sides[side]:
            continue
        count = 1 if side == "central" else int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        for _ in range(count):
            for _attempt in range(20):
                if side == "central":
                    level = "trunk"
                else:
                    level = str(rng.choice(["main", "lobar", "segmental"], p=[0.35, 0.45, 0.2]))
                cands = by_level.get((side, level), [])
                if not cands:
                    continue
                ti = int(rng.choice(cands))
                host = _host_slices(plan, plan.tubes[ti])
                if host:
                    break
            else:  # the study is so sparse that no host of this side shows: use the main artery
                ti = by_level[(side, "trunk" if side == "central" else "main")][0]
                t_mid = 0.5 * (plan.tubes[ti].t0 + plan.tubes[ti].t1)
                host = [int(np.argmin(np.abs(plan.t - t_mid)))]
            run = int(np.clip(round(rng.uniform(0.03, 0.11) * plan.n), 1, len(host)))
            start = int(rng.integers(0, len(host) - run + 1))
            lo = float(rng.uniform(0.05, 0.55))
            emboli.append(Embolus(ti, host[start:start + run], "acute", 0.0, float(rng.uniform(0, 2 * math.pi)),
                                  (lo, min(0.95, lo + rng.uniform(0.25, 0.45))), False))
    if chronicity == "acute_and_chronic" and len(emboli) == 1:
        # Mixed chronicity needs two defects: add an acute one on the same side.
        e0 = emboli[0]
        emboli.append(Embolus(e0.tube, e0.slices, "acute", 0.0, e0.angle + math.pi, (0.6, 0.95), False))
        e0.along = (0.05, 0.45)
    for i, e in enumerate(emboli):
        chronic = chronicity == "chronic" or (chronicity == "acute_and_chronic" and i % 2 == 0)
        e.style = "chronic" if chronic else "acute"
        # Acute: central "polo-mint" defect; chronic: smaller, eccentric, against the wall.
        e.frac = float(rng.uniform(0.35, 0.55) if chronic else rng.uniform(0.5, 0.8))
        e.calcified = bool(chronic and rng.random() < 0.5)
        e.hu = float(rng.uniform(65, 90) if chronic else rng.uniform(20, 55))
    plan.emboli = emboli


def _quota(n: int, p: float) -> int:
    return int(round(n * p))


def _pick(rng: np.random.Generator, pool: list[int], k: int) -> set[int]:
    return set(rng.choice(pool, size=min(k, len(pool)), replace=False).tolist()) if k > 0 and pool else set()


def plan_split(split: str, n_studies: int, seed: int, size: int, min_slices: int, max_slices: int,
               uid_style: str = "kaggle", positive_rate: float = P_POSITIVE) -> list[StudyPlan]:
    """Plan every study of a split. Exam types and sub-labels are assigned by quota (stratified), so
    even a 40-study split has about RSPECT's prevalences and at least a few positive exams.
    ``positive_rate`` (default RSPECT's 0.32) enriches positive exams, e.g. for learning tests."""
    if n_studies < 0 or min_slices < 4 or max_slices < min_slices:
        raise ValueError(f"bad phantom sizes: studies={n_studies}, slices={min_slices}..{max_slices}")
    if not 0.0 <= positive_rate <= 0.95:
        raise ValueError(f"positive_rate must be in [0, 0.95], got {positive_rate}")
    split_code = SPLITS.index(split)
    rng = np.random.default_rng([seed, split_code, 10_000])
    n_pos = _quota(n_studies, positive_rate)
    n_ind = max(_quota(n_studies, P_INDETERMINATE), 1 if n_studies >= 20 else 0)
    kinds = ["positive"] * n_pos + ["indeterminate"] * n_ind + ["negative"] * (n_studies - n_pos - n_ind)
    kinds = [kinds[i] for i in rng.permutation(n_studies)]
    pos = [i for i, k in enumerate(kinds) if k == "positive"]
    right = _pick(rng, pos, _quota(n_pos, P_RIGHT))
    left = _pick(rng, pos, _quota(n_pos, P_LEFT))
    central = _pick(rng, pos, _quota(n_pos, P_CENTRAL))
    rv = _pick(rng, pos, _quota(n_pos, P_RV_LV_GTE_1))
    chronic = _pick(rng, pos, _quota(n_pos, P_CHRONIC))
    mixed = _pick(rng, [i for i in pos if i not in chronic], _quota(n_pos, P_ACUTE_AND_CHRONIC))
    plans = []
    for i in range(n_studies):
        srng = np.random.default_rng([seed, split_code, i])
        sides = {"right": i in right, "left": i in left, "central": i in central}
        if kinds[i] == "positive" and not any(sides.values()):
            sides["right" if srng.random() < 0.55 else "left"] = True
        chronicity = "chronic" if i in chronic else "acute_and_chronic" if i in mixed else "acute"
        plans.append(_plan_study(split, i, seed, size, min_slices, max_slices, uid_style, srng, kinds[i],
                                 sides, chronicity, i in rv))
    _assign_syntaxes(plans, np.random.default_rng([seed, split_code, 10_001]))
    ids = [p.study for p in plans] + [p.series for p in plans] + [s for p in plans for s in p.sops]
    if len(set(ids)) != len(ids):  # 48-bit hashes: practically never, but never silently
        raise RuntimeError("phantom id collision; choose another seed")
    return plans


def _assign_syntaxes(plans: list[StudyPlan], rng: np.random.Generator) -> None:
    """Transfer syntaxes by quota, so that small phantoms still exercise every decoder."""
    n = len(plans)
    if n == 0:
        return
    order = rng.permutation(n).tolist()
    j2k = [int(np.argmin([p.n for p in plans]))] if n >= 3 else []
    order = [i for i in order if i not in j2k]
    n_rle = max(_quota(n, SHARE_RLE), 1 if n >= 3 else 0)
    n_jpl = max(_quota(n, SHARE_JPEG_LOSSLESS), 1 if n >= 3 else 0)
    n_imp = _quota(n, SHARE_IMPLICIT)
    for i in j2k:
        plans[i].transfer_syntax = str(dicom_uid.JPEG2000Lossless)
    # Pixel representations and InstanceNumber schemes cycle over a permutation: every kind occurs
    # as soon as a split has a handful of studies (int16/-1024 and int16/0 signed, uint16/-1024).
    reps = [("int16", -1024.0), ("int16", 0.0), ("uint16", -1024.0)]
    orders = ["z_descending", "z_ascending", "shuffled", "z_descending", "z_ascending", "offset"]
    for j, i in enumerate(rng.permutation(n).tolist()):
        p = plans[i]
        p.dtype, p.intercept = reps[j % 3]
        p.bits_stored = 12 if j % 4 == 1 else 16
        p.pad_outside_fov = p.dtype == "int16" and j % 2 == 0
        p.instance_order = orders[j % len(orders)]
        p.instance_numbers = _instance_numbers(p.instance_order, p.n, rng)
    for j, i in enumerate(order):
        if j < n_rle:
            plans[i].transfer_syntax = str(dicom_uid.RLELossless)
        elif j < n_rle + n_jpl:
            plans[i].transfer_syntax = JPEG_LOSSLESS
        elif j < n_rle + n_jpl + n_imp:
            plans[i].transfer_syntax = str(dicom_uid.ImplicitVRLittleEndian)


def _instance_numbers(order: str, n: int, rng: np.random.Generator) -> list[int]:
    """InstanceNumber per anatomical slice (apex first). Only z gives the true order (RSPECT.md)."""
    if order == "z_descending":  # acquired head to feet: numbering runs against z
        inst = np.arange(1, n + 1)
    elif order == "z_ascending":
        inst = np.arange(n, 0, -1)
    elif order == "shuffled":
        inst = rng.permutation(n) + 1
    else:  # numbering that starts elsewhere and wraps around part-way
        inst = np.roll(np.arange(n), int(rng.integers(1, n))) + int(rng.integers(2, 400))
    return [int(v) for v in inst]


def _plan_study(split: str, i: int, seed: int, size: int, min_slices: int, max_slices: int, uid_style: str,
                rng: np.random.Generator, kind: str, sides: dict[str, bool], chronicity: str,
                rv_enlarged: bool) -> StudyPlan:
    n = int(rng.integers(min_slices, max_slices + 1))
    study = make_uid(seed, uid_style, split, i, "study")
    series = make_uid(seed, uid_style, split, i, "series")
    sops = [make_uid(seed, uid_style, split, i, "sop", k) for k in range(n)]
    # Coverage from just above the apices to just below the bases, varying per study.
    t = np.linspace(rng.uniform(-0.03, 0.03), rng.uniform(0.96, 1.03), n)
    ps512 = float(rng.uniform(0.62, 0.80))  # mm per pixel at 512 px
    fov = ps512 * 512
    pixel_spacing = round(fov / size, 6)
    coverage = float(rng.uniform(250, 320))
    slice_spacing = round(coverage / n / 0.05) * 0.05  # real data: 0.625-2.5 mm; fewer slices here
    slice_thickness = round(slice_spacing * float(rng.choice([1.0, 1.0, 1.25, 2.0])), 3)
    z_top = round(float(rng.uniform(-120, 220)), 2)
    z = np.round(z_top - slice_spacing * np.arange(n), 3)  # patient +z is superior: apex highest
    a = float(min(rng.uniform(138, 172), 0.45 * fov))
    fat = float(rng.uniform(8, 25)) * a / 155
    body = {"a": a, "b": a * float(rng.uniform(0.62, 0.74)), "fat": fat, "g": a / 155,
            "cy": float(rng.uniform(-6, 10)), "lung_hu": float(rng.uniform(-880, -820))}
    ratio = float(rng.uniform(1.08, 1.5) if rv_enlarged else rng.uniform(0.6, 0.88))
    heart = {"lv": float(rng.uniform(19, 23)) * body["g"], "ratio": ratio}
    poor = kind == "indeterminate" and rng.random() < 0.5
    motion = kind == "indeterminate" and not poor
    pa = float(rng.uniform(90, 125) if poor else rng.uniform(260, 440))
    contrast = {"pa": pa, "rv": pa * float(rng.uniform(0.95, 1.1)),
                "lv": float(rng.uniform(80, 110) if poor else rng.uniform(150, 240)),
                "aorta": float(rng.uniform(70, 100) if poor else rng.uniform(150, 240)),
                "vein": float(rng.uniform(60, 90) if poor else rng.uniform(110, 180))}
    plan = StudyPlan(
        split=split, index=i, seed=seed, size=size, study=study, series=series, sops=sops, t=t, z=z,
        instance_numbers=list(range(1, n + 1)), instance_order="z_descending", pixel_spacing=pixel_spacing,
        slice_spacing=float(slice_spacing), slice_thickness=slice_thickness, dtype="int16", intercept=-1024.0,
        bits_stored=16, pad_outside_fov=False,
        transfer_syntax=str(dicom_uid.ExplicitVRLittleEndian), multi_window=bool(rng.random() < 0.7), write_slice_location=bool(rng.random() < 0.8),
        body=body, heart=heart, contrast=contrast, noise_sigma=float(rng.uniform(10, 22)), tubes=[], emboli=[],
        motion=motion, flow_artifact=bool(kind != "indeterminate" and rng.random() < 0.06), exam_kind=kind)
    plan.tubes = _plan_vessels(plan, rng)
    if kind == "positive":
        _plan_emboli(plan, rng, sides, chronicity)
    elif kind == "negative" and rng.random() < 0.04:
        ti = next(j for j, tb in enumerate(plan.tubes) if tb.name == "aorta_desc")
        host = _host_slices(plan, plan.tubes[ti])
        run = max(1, min(len(host), round(0.05 * n)))
        start = int(rng.integers(0, len(host) - run + 1))
        plan.emboli = [Embolus(ti, host[start:start + run], "aortic", 0.5, 0.0, (0.0, 1.0), False)]
    plan.labels = _exam_labels(plan, poor)
    return plan


def _exam_labels(plan: StudyPlan, poor_contrast: bool) -> dict[str, int]:
    """Exam labels from what is drawn, obeying the RSPECT hierarchy by construction."""
    pe_emboli = [e for e in plan.emboli if e.style != "aortic"]
    positive = bool(plan.positive_slices())
    sides = {plan.tubes[e.tube].side for e in pe_emboli}
    styles = {e.style for e in pe_emboli}
    lab = dict.fromkeys(rspect.EXAM_LABELS + rspect.INFO_LABELS, 0)
    if positive:
        lab["central_pe"] = int("central" in sides)
        lab["rightsided_pe"] = int("right" in sides)
        lab["leftsided_pe"] = int("left" in sides)
        lab["chronic_pe"] = int(styles == {"chronic"})
        lab["acute_and_chronic_pe"] = int(styles == {"chronic", "acute"})
        lab["rv_lv_ratio_gte_1"] = int(plan.heart["ratio"] >= 1.0)
        lab["rv_lv_ratio_lt_1"] = 1 - lab["rv_lv_ratio_gte_1"]
    elif plan.exam_kind == "indeterminate":
        lab["indeterminate"] = 1
    else:
        lab["negative_exam_for_pe"] = 1
    lab["qa_contrast"] = int(poor_contrast)
    lab["qa_motion"] = int(plan.motion)
    lab["flow_artifact"] = int(plan.flow_artifact)
    lab["true_filling_defect_not_pe"] = int(any(e.style == "aortic" for e in plan.emboli))
    return lab


# ------------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------------
_SHIFT = 4  # OpenCV sub-pixel bits: coordinates are multiplied by 16
_NOISE: dict[int, np.ndarray] = {}


def _noise_bank(size: int) -> np.ndarray:
    """A (2·size)² texture of mildly correlated unit noise, the same in every process."""
    if size not in _NOISE:
        bank = np.random.default_rng(20_201_027 + size).standard_normal((2 * size, 2 * size), dtype=np.float32)
        bank = cv2.GaussianBlur(bank, (0, 0), 0.7)
        _NOISE[size] = bank / bank.std()
    return _NOISE[size]


class _Canvas:
    """Drawing in patient mm (x to the patient's left = image right, y posterior = image down)."""

    def __init__(self, size: int, mm_per_px: float, cy_mm: float) -> None:
        self.size = size
        self.k = 1.0 / mm_per_px
        self.c = (size - 1) / 2.0
        self.cy = cy_mm
        self.img = np.full((size, size), -1000.0, np.float32)

    def px(self, x: float, y: float) -> tuple[float, float]:
        return self.c + x * self.k, self.c + (y + self.cy) * self.k

    def _pt(self, x: float, y: float) -> tuple[int, int]:
        u, v = self.px(x, y)
        return int(round(u * 16)), int(round(v * 16))

    def ellipse(self, x: float, y: float, ax: float, ay: float, hu: float, angle: float = 0.0,
                img: np.ndarray | None = None) -> None:
        axes = (max(1, int(round(ax * self.k * 16))), max(1, int(round(ay * self.k * 16))))
        cv2.ellipse(self.img if img is None else img, self._pt(x, y), axes, angle, 0, 360, float(hu), -1,
                    cv2.LINE_8, _SHIFT)

    def circle(self, x: float, y: float, r: float, hu: float, img: np.ndarray | None = None) -> None:
        cv2.circle(self.img if img is None else img, self._pt(x, y), max(1, int(round(r * self.k * 16))),
                   float(hu), -1, cv2.LINE_8, _SHIFT)

    def capsule(self, p0: tuple[float, float], p1: tuple[float, float], r: float, hu: float) -> None:
        thick = max(1, int(round(2 * r * self.k)))
        cv2.line(self.img, self._pt(*p0), self._pt(*p1), float(hu), thick, cv2.LINE_8, _SHIFT)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        """Integer pixel box (x, y, width, height) covering an mm rectangle."""
        u0, v0 = self.px(x0, y0)
        u1, v1 = self.px(x1, y1)
        xa, ya = max(0, math.floor(u0)), max(0, math.floor(v0))
        xb, yb = min(self.size, math.ceil(u1) + 1), min(self.size, math.ceil(v1) + 1)
        return xa, ya, max(1, xb - xa), max(1, yb - ya)


def _draw_body(cv: _Canvas, plan: StudyPlan, t: float) -> None:
    b = plan.body
    a, bb, fat = b["a"], b["b"], b["fat"]
    cv.ellipse(0, 0, a, bb, -100)  # subcutaneous fat
    cv.ellipse(0, 0, a - fat, bb - fat, 45)  # muscle / soft tissue
    if t > 0.8:  # liver (patient right) and spleen below the diaphragm domes
        s = min(1.0, (t - 0.8) / 0.15)
        cv.ellipse(-0.35 * a, 0.0, 0.5 * a * s + 1, 0.6 * bb * s + 1, 60)
        cv.ellipse(0.55 * a, 0.25 * bb, 0.22 * a * s + 1, 0.3 * bb * s + 1, 50)
    # Ribs: bone cross-sections just inside the fat, their angles drifting with z.
    for j in range(7):
        for sign in (-1.0, 1.0):
            ang = math.radians(-62 + 22 * j + 9 * math.sin(7 * t + j))
            x = sign * (a - fat - 7 * b["g"]) * math.sin(ang + math.pi / 2)
            y = -(bb - fat - 7 * b["g"]) * math.cos(ang + math.pi / 2)
            cv.ellipse(x, y, 5 * b["g"], 3.2 * b["g"], 650, angle=math.degrees(ang))


def _draw_lungs(cv: _Canvas, plan: StudyPlan, t: float) -> np.ndarray | None:
    """Draw both lungs; return their mask (uint8) or None when no lung is on the slice."""
    mask = None
    for side in ("right", "left"):
        e = _lung_ellipse(plan, side, t)
        if e is None:
            continue
        if mask is None:
            mask = np.zeros(cv.img.shape, np.uint8)
        cv.ellipse(*e, 1, img=mask)
    if mask is not None:
        cv.img[mask > 0] = plan.body["lung_hu"]
    return mask


def _draw_mediastinum(cv: _Canvas, plan: StudyPlan, t: float) -> None:
    g = plan.body["g"]
    b = plan.body["b"] - plan.body["fat"]
    if 0.12 < t < 0.6:
        cv.ellipse(2 * g, -22 * g, 34 * g, 40 * g, -85)  # mediastinal fat around the great vessels
    # Trachea, then the main bronchi (air with a soft-tissue wall).
    if t < 0.34:
        cv.circle(0, -4 * g, 10.5 * g, 40)
        cv.circle(0, -4 * g, 8.5 * g, -980)
    elif t < 0.46:
        a = (t - 0.34) / 0.12
        for sgn in (-1, 1):
            x, y = sgn * (6 + 26 * a) * g, (-2 + 10 * a) * g
            cv.circle(x, y, 7.0 * g, 40)
            cv.circle(x, y, 5.5 * g, -980)
    cv.circle(4 * g, 30 * g, 5 * g, 35)  # oesophagus
    # Spine: cortical ring, cancellous body, canal and posterior elements; sternum in front.
    yv = 0.62 * b + 10 * g
    cv.ellipse(0, yv + 30 * g, 26 * g, 9 * g, 600)
    cv.circle(0, yv, 18 * g, 700)
    cv.circle(0, yv, 15.5 * g, 230)
    cv.circle(0, yv + 23 * g, 7 * g, 20)
    if 0.15 < t < 0.9:
        cv.ellipse(0, -b + 8 * g, 14 * g, 6 * g, 500)


def _draw_heart(cv: _Canvas, plan: StudyPlan, t: float) -> None:
    s = _interp(t, _HEART_T, _HEART_S)
    g = plan.body["g"]
    c = plan.contrast
    if 0.44 < t < 0.6:  # left atrium, posterior
        cv.circle(18 * g, 16 * g, 17 * g * min(1.0, (0.6 - t) / 0.05 + 0.2), c["lv"])
    if s <= 0.05:
        return
    hx, hy = 24 * g, -30 * g
    lv = plan.heart["lv"] * s
    rv = lv * plan.heart["ratio"]
    cv.ellipse(hx, hy, 62 * g * s + 6 * g, 46 * g * s + 5 * g, 45, angle=-25)  # myocardium
    # LV: posterior-left, thick wall; RV: anterior-right, crescent-ish; RV/LV = transverse diameters.
    cv.ellipse(hx + 18 * g * s, hy + 8 * g * s, lv, 0.8 * lv, c["lv"], angle=-25)
    cv.ellipse(hx - 16 * g * s - 0.45 * (rv - lv), hy - 14 * g * s, rv, 0.62 * rv, c["rv"], angle=-25)


def _draw_tubes(cv: _Canvas, plan: StudyPlan, t: float, lung_mask: np.ndarray | None,
                ) -> dict[int, tuple[float, float, float]]:
    """Draw every vessel on the slice; return the geometry of the disks drawn (for emboli)."""
    drawn: dict[int, tuple[float, float, float]] = {}
    flow_dim = 0.55 if plan.flow_artifact else 1.0
    masked = [i for i, tb in enumerate(plan.tubes) if tb.masked and tb.t0 <= t <= tb.t1]
    if masked and lung_mask is not None:
        layer = cv.img.copy()
        for i in masked:
            x, y, r = plan.tubes[i].at(t)
            cv.circle(x, y, r, plan.tubes[i].hu, img=layer)
        inside = lung_mask > 0
        cv.img[inside] = layer[inside]
    for i, tb in enumerate(plan.tubes):
        if tb.masked or not tb.t0 <= t <= tb.t1:
            continue
        hu = tb.hu
        if plan.flow_artifact and tb.level in ("lobar", "segmental") and t > 0.6:
            hu *= flow_dim  # mixing of unopacified blood: smooth dimming, not a sharp defect
        if tb.kind == "disk":
            x, y, r = tb.at(t)
            cv.circle(x, y, r, hu)
            drawn[i] = (x, y, r)
        else:
            cv.capsule(tb.p0, tb.p1, tb.r0, hu)
    return drawn


def _draw_emboli(cv: _Canvas, plan: StudyPlan, k: int, drawn: dict[int, tuple[float, float, float]],
                 ) -> list[tuple[int, int, int, int]]:
    """Draw the filling defects on slice k; return one pixel box per PE embolus."""
    boxes = []
    for e in plan.emboli:
        if k not in e.slices:
            continue
        tb = plan.tubes[e.tube]
        j = e.slices.index(k)
        taper = 0.7 + 0.3 * math.sin(math.pi * (j + 0.5) / len(e.slices))  # smaller at the run's ends
        chronic = e.style == "chronic"
        hu = e.hu
        if tb.kind == "disk":
            x, y, r = drawn[e.tube] if e.tube in drawn else tb.at(float(plan.t[k]))
            rd = e.frac * taper * r
            if chronic:  # eccentric, against the wall
                d = r - rd - 0.08 * r
                x, y = x + d * math.cos(e.angle), y + d * math.sin(e.angle)
            cv.circle(x, y, rd, hu)
            if e.calcified and j % 2 == 0:
                off = 0.5 * rd
                cv.circle(x + off * math.cos(e.angle), y + off * math.sin(e.angle), max(0.35 * rd, 0.6), 750)
            if e.style != "aortic":
                boxes.append(cv.box(x - rd, y - rd, x + rd, y + rd))
        else:
            (x0, y0), (x1, y1) = tb.p0, tb.p1
            a, b = e.along
            q0 = (x0 + a * (x1 - x0), y0 + a * (y1 - y0))
            q1 = (x0 + b * (x1 - x0), y0 + b * (y1 - y0))
            rd = e.frac * taper * tb.r0
            if chronic:  # shift perpendicular to the vessel axis, against one wall
                nx, ny = -(y1 - y0), x1 - x0
                norm = math.hypot(nx, ny)
                d = (tb.r0 - rd - 0.08 * tb.r0) * (1 if math.cos(e.angle) >= 0 else -1)
                q0 = (q0[0] + d * nx / norm, q0[1] + d * ny / norm)
                q1 = (q1[0] + d * nx / norm, q1[1] + d * ny / norm)
            cv.capsule(q0, q1, rd, hu)
            if e.calcified and j % 2 == 0:
                cv.circle(0.5 * (q0[0] + q1[0]), 0.5 * (q0[1] + q1[1]), max(0.35 * rd, 0.6), 750)
            boxes.append(cv.box(min(q0[0], q1[0]) - rd, min(q0[1], q1[1]) - rd,
                                max(q0[0], q1[0]) + rd, max(q0[1], q1[1]) + rd))
    return boxes


def _motion(img: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Breathing motion: directional blur plus a faint ghost of the slice."""
    length = max(4, int(round(rng.uniform(12, 24) * scale)))
    kern = np.zeros((length, length), np.float32)
    kern[length // 2, :] = 1.0 / length
    rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), float(rng.uniform(0, 180)), 1.0)
    kern = cv2.warpAffine(kern, rot, (length, length))
    kern /= kern.sum()
    out = cv2.filter2D(img, -1, kern, borderType=cv2.BORDER_REPLICATE)
    shift = np.float32([[1, 0, rng.uniform(-6, 6) * scale], [0, 1, rng.uniform(4, 10) * scale]])
    ghost = cv2.warpAffine(out, shift, img.shape[::-1], borderMode=cv2.BORDER_REPLICATE)
    return 0.7 * out + 0.3 * ghost


def render_slice(plan: StudyPlan, k: int, rng: np.random.Generator,
                 ) -> tuple[np.ndarray, list[tuple[int, int, int, int]], np.ndarray | None]:
    """HU image (float32) of anatomical slice k, its embolus boxes and its lung mask."""
    t = float(plan.t[k])
    cv = _Canvas(plan.size, plan.pixel_spacing, plan.body["cy"])
    _draw_body(cv, plan, t)
    lung = _draw_lungs(cv, plan, t)
    _draw_mediastinum(cv, plan, t)
    _draw_heart(cv, plan, t)
    drawn = _draw_tubes(cv, plan, t, lung)  # after the heart: the trunk leaves the RV on top of it
    boxes = _draw_emboli(cv, plan, k, drawn)
    scale = plan.size / 512
    img = cv.img
    if plan.motion:
        img = _motion(img, rng, scale)
    if scale > 0.4:  # partial-volume softening of edges
        img = cv2.GaussianBlur(img, (0, 0), 0.6 * scale + 0.2)
    bank = _noise_bank(plan.size)
    oy, ox = (int(v) for v in rng.integers(0, plan.size, 2))
    noise = bank[oy:oy + plan.size, ox:ox + plan.size]
    # Noise grows in dense regions a little (photon starvation) and stays CT-like elsewhere.
    img = img + plan.noise_sigma * noise
    return img, boxes, lung


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


def build_study(plan: StudyPlan, out: Path, compress: bool = True) -> StudyResult:
    """Render and write every slice of one study; return its label rows, boxes and lung extent."""
    rng = np.random.default_rng([plan.seed, SPLITS.index(plan.split), plan.index, 1])
    folder = Path(out) / plan.split / plan.study / plan.series
    folder.mkdir(parents=True, exist_ok=True)
    positives = plan.positive_slices()
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
    return StudyResult([rows[i] for i in order], boxes, lung_box, len(positives))


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


MARKER_FILE = ".pe_phantom"  # written first, so even a phantom whose run was cut short is recognised


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
                 compress: bool = True, positive_rate: float = P_POSITIVE) -> None:
    """Write a synthetic RSPECT look-alike to ``out`` (layout of CONTRACTS.md row 00).

    ``uid_style``: ``kaggle`` (12-hex ids like the real data) or ``dicom`` (2.25.* UIDs).
    ``compress=False`` writes every file uncompressed with otherwise identical content (tests use it
    to check lossless decoding)."""
    if uid_style not in UID_STYLES:
        raise ValueError(f"uid_style must be one of {UID_STYLES}, got {uid_style!r}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _prepare_out(out, dict(train_studies=train_studies, test_studies=test_studies, seed=seed, size=size,
                           min_slices=min_slices, max_slices=max_slices, uid_style=uid_style, compress=compress,
                           positive_rate=positive_rate))
    plans = {s: plan_split(s, n, seed, size, min_slices, max_slices, uid_style, positive_rate)
             for s, n in (("train", train_studies), ("test", test_studies))}
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
    sub_ids = [rspect.exam_row_id(p.study, lab) for p, _ in by_split["test"] for lab in rspect.EXAM_LABELS]
    sub_ids += test_full[rspect.SOP].tolist()
    pe_io.write_csv_atomic(pd.DataFrame({"id": sub_ids, "label": 0.5}), out / "sample_submission.csv")
    for split, name in (("train", "train_boxes.csv"), ("test", TEST_BOXES_FILE)):
        boxes = [b for _, res in by_split[split] for b in res.boxes]
        pe_io.write_csv_atomic(pd.DataFrame(boxes, columns=list(BOX_COLUMNS)), out / name)
    shutil.rmtree(out / ".scratch", ignore_errors=True)
    truth = pd.DataFrame([_truth_row(p, r) for s in SPLITS for p, r in by_split[s]])
    pe_io.write_csv_atomic(truth, out / TRUTH_FILE)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
