"""Every workaround pnp needs to run detectron2, in one place.

detectron2 is not published on PyPI under its own name. ``pnp.detection.install``
installs the Python sources of detectron2 v0.6 from the ``pb1-detectron2`` sdist,
which lacks the C++/CUDA sources of the compiled ops (``detectron2._C``). Two
things then stop ``import detectron2.modeling`` and are patched here, each only
when needed:

* **A placeholder ``detectron2._C``.** ``detectron2/layers`` imports ``_C`` at
  import time although only deformable convolution, rotated boxes and the fast
  COCO evaluator use it; Faster R-CNN with a ResNet/FPN backbone never does. The
  placeholder is put in ``sys.modules`` only when no compiled ``detectron2._C``
  exists; any op looked up on it raises :class:`MissingCompiledOpError` naming
  the op (use ``COCOEvaluator(..., use_fast_impl=False)``; for the rest, build
  detectron2 from source). Dunder and private lookups raise ``AttributeError``,
  as on a real module, because torch's op registration and ``hasattr`` probe them.
  With a complete detectron2 built from source this is a no-op and the real
  ops are used as they are.
* **``PIL.Image.LINEAR``.** detectron2 0.6 reads it at import time; Pillow 10
  removed it (it was always an alias of ``BILINEAR``). The alias is added back
  only when Pillow lacks it.

Everything in pnp that uses detectron2 imports it through :func:`import_detectron2`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

INSTALL_HINT = "install it with `make setup-detection` (or `python -m pnp.detection.install`)"
PLACEHOLDER_NAME = "detectron2._C"


class DetectronUnavailableError(ImportError):
    """detectron2 is not installed."""


class MissingCompiledOpError(NotImplementedError):
    """A compiled detectron2 op was used, but this detectron2 has no compiled ops."""


class MissingCompiledOps(types.ModuleType):
    """Stands in for ``detectron2._C`` when detectron2 was installed without its compiled ops."""

    pnp_placeholder = True

    def __init__(self):
        super().__init__(PLACEHOLDER_NAME, "placeholder for detectron2's compiled ops, put here by pnp.detection.compat")

    # collect_env (called by detectron2's default_setup) asks for these; they are facts, not ops
    @staticmethod
    def get_compiler_version() -> str:
        return "none (detectron2 installed without its compiled ops)"

    @staticmethod
    def get_cuda_version() -> str:
        return "none (detectron2 installed without its compiled ops)"

    @staticmethod
    def has_cuda() -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(f"module {PLACEHOLDER_NAME!r} has no attribute {name!r}")
        raise MissingCompiledOpError(
            f"detectron2's compiled op {name!r} is not available: this detectron2 was installed without its "
            "C++/CUDA extension (pnp.detection.install). Faster R-CNN/FPN does not need it; for COCO evaluation "
            "pass use_fast_impl=False to COCOEvaluator; for deformable convolution or rotated boxes, install "
            "detectron2 built from source (https://github.com/facebookresearch/detectron2), which pnp then uses as it is"
        )


def has_compiled_ops() -> bool:
    """True when an installed detectron2 has its compiled ``detectron2._C`` (and it is not the placeholder)."""
    module = sys.modules.get(PLACEHOLDER_NAME)
    if module is not None:
        return not getattr(module, "pnp_placeholder", False)
    try:
        return importlib.util.find_spec(PLACEHOLDER_NAME) is not None
    except ImportError:  # detectron2 itself is missing
        return False


def add_pillow_linear() -> bool:
    """Give Pillow back ``Image.LINEAR`` (= ``BILINEAR``) if it lacks it; True when added."""
    from PIL import Image

    if hasattr(Image, "LINEAR"):
        return False
    Image.LINEAR = Image.BILINEAR
    return True


def add_placeholder_ops() -> bool:
    """Register :class:`MissingCompiledOps` as ``detectron2._C`` if detectron2 has no compiled ops; True when added."""
    if has_compiled_ops():
        return False
    if PLACEHOLDER_NAME not in sys.modules:
        placeholder = MissingCompiledOps()
        sys.modules[PLACEHOLDER_NAME] = placeholder
        importlib.import_module("detectron2")._C = placeholder
    return True


def import_detectron2() -> types.ModuleType:
    """Apply the workarounds that this installation needs and return the ``detectron2`` package."""
    try:
        detectron2 = importlib.import_module("detectron2")
    except ModuleNotFoundError as exc:
        if exc.name != "detectron2":
            raise
        raise DetectronUnavailableError(f"detectron2 is not installed; {INSTALL_HINT}") from None
    add_pillow_linear()
    add_placeholder_ops()
    return detectron2
