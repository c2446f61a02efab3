"""edgepack-agent: the device side. Polls, verifies, installs and rolls back models.

Nothing in this package may import torch, onnx, skl2onnx or any other
builder-only package (tests/agent/test_footprint.py checks it in a fresh interpreter).
"""

from device_agent.api import active_model_path, open_session
from edgepack._version import __version__

__all__ = ["__version__", "active_model_path", "open_session"]
