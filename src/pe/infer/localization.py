"""The kernel's localisation output (condrea2024): the stage-12 student run on every study the kernel
decodes, its PE clusters written as ``localization.csv`` next to the submission (the columns of stage
12's ``clusters.csv``, :data:`pe.localize.teacher_stage.CLUSTER_COLUMNS`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pe.infer.studies import StudyImages
from pe.rspect import STUDY


@dataclasses.dataclass
class Student:
    """A loaded student: the network (eval mode, on its device), its config and the cluster filter."""

    model: torch.nn.Module
    cfg: Any  # pe.localize.student.StudentConfig
    flt: Any  # pe.localize.clusters.ClusterFilter for the kernel's image size


def load_student_model(path: Path, device: torch.device, size: int) -> Student:
    """Stage 12's ``model.pt`` (``weights_only`` load) for inference at ``size`` px; ValueError naming
    the file when it cannot be loaded."""
    from pe.localize.student_stage import StudentStageConfig, load_student

    try:
        model, cfg, _ = load_student(Path(path), device)
    except Exception as e:  # a missing file or a checkpoint of another code version: name the file
        raise ValueError(f"{path}: cannot load the localisation student ({type(e).__name__}: {e})") from e
    return Student(model, cfg, StudentStageConfig().cluster_filter(size))


def localize_study(student: Student, item: StudyImages) -> pd.DataFrame:
    """The student's PE clusters of one study: its PE-window volume from the decoded 3-window slices,
    as stage 12 builds it from the cache."""
    from pe.localize.frames import pe_window
    from pe.localize.student import predict_clusters
    from pe.localize.teacher_stage import study_clusters

    labels, prob = predict_clusters(student.model, pe_window(item.images), student.cfg, student.flt)
    return study_clusters(item.study, labels, prob, list(item.sops))


def write_localization(clusters: list[pd.DataFrame], out: Path, n_studies: int) -> dict[str, Any]:
    """Write every study's clusters to ``out`` (atomically; a header only when there are none) and
    return the summary's ``localization`` entry."""
    from pe.io import write_csv_atomic
    from pe.localize.teacher_stage import CLUSTER_COLUMNS

    frames = [c for c in clusters if len(c)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CLUSTER_COLUMNS)
    write_csv_atomic(table, out)
    return {"out": str(out), "clusters": len(table),
            "studies_with_clusters": int(table[STUDY].nunique()) if len(table) else 0, "studies": n_studies}
