"""The phantom's plan of every study: constants (label rates, storage shares, file names), ids, the
vessel tree and emboli in mm, and the exam labels, all drawn from a (seed, split, study) random stream.
The images are drawn by :mod:`pe.synthetic.phantom_draw` and written by :mod:`pe.synthetic.phantom`."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

import numpy as np
from pydicom import uid as dicom_uid

from pe import rspect
from pe.synthetic.phantom_scale import scale_emboli

SPLITS: tuple[str, ...] = ("train", "test")
TRUTH_FILE = "phantom_truth.csv"
TEST_LABELS_FILE = "phantom_test_labels.csv"  # test.csv with the labels (train.csv layout)
TEST_BOXES_FILE = "phantom_test_boxes.csv"
BOX_COLUMNS: tuple[str, ...] = ("SOPInstanceUID", "x", "y", "width", "height")
# Shortcut (papers/shi2020_* 3.4: a CNN latches on background that correlates with PE): a feature
# unrelated to the emboli drawn in the anterior left chest wall of PE-positive TRAIN slices only.
SHORTCUT_KINDS: tuple[str, ...] = ("marker", "stripes")
SHORTCUT_FILE = "phantom_shortcut.csv"  # SOPInstanceUID, x, y, radius (pixels) of every planted shortcut


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
    shortcut_rate: float = 0.0  # share of positive slices given the shortcut (train split only)
    shortcut_kind: str = "marker"

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


def _plan_emboli(plan: StudyPlan, rng: np.random.Generator, sides: dict[str, bool], chronicity: str,
                 embolus_scale: float = 1.0) -> None:
    """Place emboli so that the location flags hold, each on >= 1 slice of its host vessel; then
    ``embolus_scale`` != 1 scales every PE embolus (:func:`pe.synthetic.phantom_scale.scale_emboli`)."""
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
    if embolus_scale != 1.0:
        scale_emboli(emboli, embolus_scale, lambda e: _host_slices(plan, plan.tubes[e.tube]))
    plan.emboli = emboli


def _quota(n: int, p: float) -> int:
    return int(round(n * p))


def _pick(rng: np.random.Generator, pool: list[int], k: int) -> set[int]:
    return set(rng.choice(pool, size=min(k, len(pool)), replace=False).tolist()) if k > 0 and pool else set()


def plan_split(split: str, n_studies: int, seed: int, size: int, min_slices: int, max_slices: int,
               uid_style: str = "kaggle", positive_rate: float = P_POSITIVE,
               embolus_scale: float = 1.0) -> list[StudyPlan]:
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
                                 sides, chronicity, i in rv, embolus_scale))
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
                rv_enlarged: bool, embolus_scale: float = 1.0) -> StudyPlan:
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
        _plan_emboli(plan, rng, sides, chronicity, embolus_scale)
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


MARKER_FILE = ".pe_phantom"  # written first, so even a phantom whose run was cut short is recognised
