"""The phantom's drawing: one slice of a planned study rendered in Hounsfield units with OpenCV
primitives (body, lungs, mediastinum, heart, vessels, emboli), partial-volume blur, CT-like noise
and motion ghosting."""

from __future__ import annotations

import math

import cv2
import numpy as np

from pe.synthetic.phantom_plan import (
    _HEART_S,
    _HEART_T,
    StudyPlan,
    _interp,
    _lung_ellipse,
)

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
