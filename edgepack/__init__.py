"""edgepack: ship ML models to edge fleets, signed, encrypted and published through TUF.

This package root stays light on purpose: the device agent imports
``edgepack.bundle``, ``edgepack.crypto``, ``edgepack.signing`` and friends,
so nothing here may pull in onnx, torch or other builder-only packages.
"""

from edgepack._version import __version__

__all__ = ["__version__"]


def __getattr__(name: str) -> object:
    """``edgepack.build(...)`` without importing the builder (onnx, torch) until it is used."""
    if name == "build":
        import importlib

        return importlib.import_module("edgepack.build")
    raise AttributeError(f"module 'edgepack' has no attribute {name!r}")
