"""edgepack: ship ML models to edge fleets, signed, encrypted and published through TUF.

This package root stays light on purpose: the device agent imports
``edgepack.bundle``, ``edgepack.crypto``, ``edgepack.signing`` and friends,
so nothing here may pull in onnx, torch or other builder-only packages.
"""

from edgepack._version import __version__

__all__ = ["__version__"]
