"""Object detection with detectron2: data, detectors and (later) their pruning.

The only part of pnp that imports detectron2, always through
:func:`pnp.detection.compat.import_detectron2`. Importing this package does not
import detectron2, so ``python -m pnp.detection.install`` runs before it is installed.
"""
