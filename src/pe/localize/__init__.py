"""Weakly supervised PE localisation (condrea2024): hysteresis, clusters, teacher, pseudo_io, student.

- hysteresis: 3D hysteresis clustering of a heatmap with the paper's (15, 15, 5) seed neighbourhood
- clusters: size/distance filtering, Pu et al. cluster matching, sensitivity/PPV/F1 with bootstrap CIs
- teacher: captum Integrated Gradients + iterative masking of a 2.5D classifier → 3D pseudo-masks
- pseudo_io: pseudo-masks as per-slice run-length parquet parts, atomic and resumable per study
- student: MONAI DynUNet (pe.models.seg3d) trained on pseudo-masks, sliding-window prediction
"""
