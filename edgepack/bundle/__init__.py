"""Bundle format v2 (v1 still read): pack, read, verify and unpack edgepack bundles.

Importable by the device agent: nothing here needs onnx or any converter.
The byte-level format is specified in docs/bundle-format.md.
"""

from edgepack.bundle.metadata import FORMAT_VERSION, Limits, PayloadFile, bundle_file_name
from edgepack.bundle.reader import (
    BundleInfo,
    VerifyReport,
    check_signature,
    read_info,
    unpack,
    verify,
)
from edgepack.bundle.writer import PackResult, pack

__all__ = [
    "FORMAT_VERSION",
    "BundleInfo",
    "Limits",
    "PackResult",
    "PayloadFile",
    "VerifyReport",
    "bundle_file_name",
    "check_signature",
    "pack",
    "read_info",
    "unpack",
    "verify",
]
