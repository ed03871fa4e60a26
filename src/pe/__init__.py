"""pe: the RSPECT pulmonary-embolism pipeline package.

All logic lives here; the numbered scripts in ``src/`` and the Kaggle kernel are thin wrappers.
Where things live (one line per subpackage; README "Where things live" says the same):

- ``pe.rspect`` facts of the data set (labels, weights, rules); ``pe.ids`` submission row ids;
  ``pe.paths`` folders (env overrides); ``pe.config`` config loading and the experiment dataclasses;
  ``pe.io`` atomic writes; ``pe.distributed`` torchrun helpers.
- ``pe.data`` DICOM reading, metadata, windows, the JPEG cache, folds, label tables, the CNN slice
  dataset and the stage-2 study sequences.
- ``pe.anatomy`` where the body, lungs and heart are (lung box; masks and landmarks).
- ``pe.models`` networks: the 2.5D slice CNN, the stage-2 sequence model and the models to come.
- ``pe.train`` the shared training core, losses, and one trainer per model.
- ``pe.explain`` Grad-CAM, Integrated Gradients and the pointing game.
- ``pe.eval`` the metric, hierarchy repair, submissions, baselines, ensembling and benchmarks.
- ``pe.infer`` embedding export and the offline Kaggle kernel.
- ``pe.report`` the HTML report.
- ``pe.synthetic`` the phantom (a synthetic RSPECT look-alike) and synthetic test inputs.
"""

import os

# albumentations asks PyPI for a newer version on import unless this is set: a warning on every
# run and a stall in an offline Kaggle notebook. Set before any submodule imports albumentations.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
