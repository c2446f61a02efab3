"""edgepack-agent: the device side. Polls, verifies, installs and rolls back models.

Nothing in this package may import torch, onnx, skl2onnx or any other
builder-only package (tests/test_footprint.py checks it in a fresh interpreter).
"""

from edgepack._version import __version__

__all__ = ["__version__"]
