"""Convert scikit-learn estimators with skl2onnx (imported only when one is built)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgepack.build._util import quiet, tool_versions
from edgepack.build.convert import Converted
from edgepack.build.samples import Array, Feed
from edgepack.errors import InvalidInputError

INPUT_NAME = "input"


def convert(estimator: Any, out_dir: Path) -> Converted:
    """Convert a fitted estimator; float32 input (float64 would make a DOUBLE input), no ZipMap."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    features = getattr(estimator, "n_features_in_", None)
    if not isinstance(features, int):
        raise InvalidInputError(
            f"the {type(estimator).__name__} is not fitted (no n_features_in_)",
            hint="fit the estimator before building it",
        )
    classifier = bool(is_classifier(estimator))
    # ZipMap turns probabilities into a list of dicts that onnxruntime returns as Python
    # objects: slow, and impossible to compare or quantise. Plain tensors instead.
    options = {"zipmap": False} if classifier else None
    try:
        with quiet():
            proto = to_onnx(
                estimator,
                initial_types=[(INPUT_NAME, FloatTensorType([None, features]))],
                options=options,
            )
    except Exception as exc:
        raise InvalidInputError(
            f"skl2onnx cannot convert the {type(estimator).__name__}: "
            f"{' '.join(str(exc).split())[:300]}"
        ) from exc
    target = out_dir / "model.onnx"
    onnx.save_model(proto, str(target))

    def reference(feed: Feed) -> list[Array]:
        data = next(iter(feed.values()))
        if classifier:
            return [np.asarray(estimator.predict(data)), np.asarray(estimator.predict_proba(data))]
        return [np.asarray(estimator.predict(data))]

    return Converted(
        target,
        "skl2onnx",
        "",
        tool_versions("skl2onnx", "scikit-learn"),
        reference=reference,
        classifier=classifier,
    )
