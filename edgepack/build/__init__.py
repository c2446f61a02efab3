"""The model builder: convert, quantise per hardware profile, validate, pack.

Builder-only packages (onnx, skl2onnx, torch, scikit-learn) are imported here
and never by modules the device agent imports. torch is imported only when a
torch model is built.

The package itself is callable, so ``import edgepack.build`` then
``edgepack.build(model, ...)`` is the same as calling :func:`build`.

>>> from edgepack.build import build
>>> build(model, name="digits", version="1.0.0", hw=["raspberry-pi-4"], out_dir="dist",
...       recipients=[public_key], signer=signer, validation="val.npz")  # doctest: +SKIP
"""

import sys
import types
from typing import Any

from edgepack.build.api import BuildResult, Staged, Variant, build, build_variants
from edgepack.build.quantize import RECIPES, QualityTargetError, Recipe, Target
from edgepack.build.report import BuildReport, VariantReport
from edgepack.build.validate import Parity, UnsupportedOperatorError

__all__ = [
    "RECIPES",
    "BuildReport",
    "BuildResult",
    "Parity",
    "QualityTargetError",
    "Recipe",
    "Staged",
    "Target",
    "UnsupportedOperatorError",
    "Variant",
    "VariantReport",
    "build",
    "build_variants",
]


class _CallableModule(types.ModuleType):
    """Lets ``edgepack.build(...)`` call :func:`build` while ``edgepack.build`` stays a package."""

    def __call__(self, *args: Any, **kwargs: Any) -> BuildResult:
        return build(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
