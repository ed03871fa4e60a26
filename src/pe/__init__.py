"""pe: the RSPECT pulmonary-embolism pipeline package.

All logic lives here; the numbered scripts in ``src/`` and the Kaggle kernel are thin wrappers.
"""

__version__ = "0.1.0"
