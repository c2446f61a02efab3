"""The model builder: convert, quantise per hardware profile, validate, pack.

Builder-only packages (onnx, skl2onnx, torch, scikit-learn) are imported here
and never by modules the device agent imports. torch is imported only when a
torch model is built.

>>> from edgepack.build import build
>>> build(model, name="digits", version="1.0.0", hw=["raspberry-pi-4"], out_dir="dist",
...       recipients=[public_key], signer=signer, validation="val.npz")  # doctest: +SKIP
"""

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
