"""The single source of truth for RSPECT facts: label names, metric weights, id formats and the
label-consistency rules (see shared/RSPECT.md). No other module repeats these values.
"""

from __future__ import annotations

import re

# --- columns of train.csv -------------------------------------------------------------------
ID_COLUMNS: tuple[str, ...] = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
STUDY, SERIES, SOP = ID_COLUMNS

IMAGE_LABEL = "pe_present_on_image"

# The nine scored exam labels, in the order of the metric table in RSPECT.md.
EXAM_LABELS: tuple[str, ...] = (
    "negative_exam_for_pe",
    "indeterminate",
    "chronic_pe",
    "acute_and_chronic_pe",
    "central_pe",
    "leftsided_pe",
    "rightsided_pe",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
)

# Informational exam columns of train.csv: present in the data, never scored or submitted.
INFO_LABELS: tuple[str, ...] = (
    "qa_motion",
    "qa_contrast",
    "flow_artifact",
    "true_filling_defect_not_pe",
)

# train.csv column order exactly as distributed by Kaggle.
TRAIN_COLUMNS: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "pe_present_on_image",
    "negative_exam_for_pe",
    "qa_motion",
    "qa_contrast",
    "flow_artifact",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
    "leftsided_pe",
    "chronic_pe",
    "true_filling_defect_not_pe",
    "rightsided_pe",
    "acute_and_chronic_pe",
    "central_pe",
    "indeterminate",
)
TEST_COLUMNS: tuple[str, ...] = ID_COLUMNS
SUBMISSION_COLUMNS: tuple[str, ...] = ("id", "label")

# --- metric weights (RSPECT.md, to the printed precision) ---------------------------------------
# Image rows: IMAGE_WEIGHT * q_i, q_i = share of positive images in exam i (from the truth).
IMAGE_WEIGHT: float = 0.07361963
EXAM_WEIGHTS: dict[str, float] = {
    "negative_exam_for_pe": 0.0736196319,
    "indeterminate": 0.09202453988,
    "chronic_pe": 0.1042944785,
    "acute_and_chronic_pe": 0.1042944785,
    "central_pe": 0.1877300613,
    "leftsided_pe": 0.06257668712,
    "rightsided_pe": 0.06257668712,
    "rv_lv_ratio_gte_1": 0.2346625767,
    "rv_lv_ratio_lt_1": 0.0782208589,
}
EXAM_WEIGHT_VECTOR: tuple[float, ...] = tuple(EXAM_WEIGHTS[k] for k in EXAM_LABELS)
# Predictions are clipped to [EPS, 1 - EPS] before the log.
CLIP_EPS: float = 1e-15

# --- label hierarchy --------------------------------------------------------------------------
# "> 0.5" is strict everywhere: exactly 0.5 is *not* positive.
THRESHOLD: float = 0.5
RV_LV_LABELS: tuple[str, str] = ("rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1")
LOCATION_LABELS: tuple[str, str, str] = ("central_pe", "rightsided_pe", "leftsided_pe")
CHRONICITY_LABELS: tuple[str, str] = ("chronic_pe", "acute_and_chronic_pe")
NEGATIVE_LABELS: tuple[str, str] = ("indeterminate", "negative_exam_for_pe")
# The seven labels that only a positive exam may have above 0.5.
POSITIVE_ONLY_LABELS: tuple[str, ...] = RV_LV_LABELS + LOCATION_LABELS + CHRONICITY_LABELS

# Rule ids as used in reports: 1x apply to predicted-positive exams, 2x to predicted-negative ones.
RULES: dict[str, str] = {
    "1a": "positive exam: exactly one of rv_lv_ratio_gte_1 / rv_lv_ratio_lt_1 > 0.5",
    "1b": "positive exam: at least one of central_pe / rightsided_pe / leftsided_pe > 0.5",
    "1c": "positive exam: not both chronic_pe and acute_and_chronic_pe > 0.5",
    "1d": "positive exam: indeterminate <= 0.5 and negative_exam_for_pe <= 0.5",
    "2a": "negative exam: exactly one of indeterminate / negative_exam_for_pe > 0.5",
    "2b": "negative exam: all seven positive-only labels <= 0.5",
}

# --- ids --------------------------------------------------------------------------------------
# Real RSPECT ids on Kaggle are anonymised 12-character lowercase hex strings (e.g. 6897fa9de148);
# the DICOM standard's UID grammar (dot-separated numbers without leading zeros, <= 64 chars) is
# also accepted. Both are safe as file-name components; anything else is rejected before an id
# from a header ever becomes part of a path.
_HEX_ID = re.compile(r"[0-9a-f]{12}")
_DICOM_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def is_valid_uid(uid: object) -> bool:
    """True when ``uid`` is an RSPECT hex id or a valid DICOM UID (and so safe as a file name)."""
    if not isinstance(uid, str):
        return False
    if _HEX_ID.fullmatch(uid):
        return True
    return len(uid) <= 64 and _DICOM_UID.fullmatch(uid) is not None
