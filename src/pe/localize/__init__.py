"""Weakly supervised PE localisation (condrea2024): hysteresis, clusters, teacher, pseudo_io, student.

- hysteresis: 3D hysteresis clustering of a heatmap with the paper's (15, 15, 5) seed neighbourhood
- clusters: size/distance filtering, Pu et al. cluster matching, sensitivity/PPV/F1 with bootstrap CIs
- teacher: captum Integrated Gradients + iterative masking of a 2.5D classifier → 3D pseudo-masks
- pseudo_io: pseudo-masks as per-slice run-length parquet parts, atomic and resumable per study
- student: MONAI DynUNet (pe.models.seg3d) trained on pseudo-masks, sliding-window prediction
- frames: the cache frame all localisation volumes share, the PE window, box truth → 3D emboli
- teacher_stage / student_stage: stages 11 and 12 over whole studies (src/11_pseudo_masks.py,
  src/12_train_student.py), resumable per study, clusters CSV per split
- evaluate: the paper's tables (teacher per round, with/without filter, student) with bootstrap CIs
"""
