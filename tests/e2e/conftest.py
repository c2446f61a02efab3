"""Session fixtures: keys, the digits model and every bundle of the story, made once.

Both server runs and the air-gapped test share them, so the expensive part
(training, converting, quantising, packing) happens once per session.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e._support import (
    PASSPHRASE,
    Keys,
    Releases,
    broken_release,
    build_release,
    generate_keys,
    load_digits_split,
    train,
)


@pytest.fixture(scope="session")
def e2e_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return generate_keys(tmp_path_factory.mktemp("e2e-keys") / "keys")


@pytest.fixture(scope="session")
def releases(e2e_keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Releases:
    """v1 (good), v2 (validly signed, broken weights, v1's health set), v3 (good, retrained)."""
    out = tmp_path_factory.mktemp("e2e-build")
    data = load_digits_split()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPACK_PASSPHRASE", PASSPHRASE)  # the producer's and devices' key files
        model_v1 = train(data, seed=0)
        model_v3 = train(data, seed=1)
        v1 = build_release(model_v1, "1.0.0", e2e_keys, data, out / "1.0.0")
        v2 = broken_release(v1, e2e_keys, data, out, "2.0.0")
        v3 = build_release(model_v3, "3.0.0", e2e_keys, data, out / "3.0.0")
    both_right = (model_v1.predict(data.x_test) == data.y_test) & (
        model_v3.predict(data.x_test) == data.y_test
    )
    probe = int(np.flatnonzero(both_right)[0])
    return Releases(v1=v1, v2_broken=v2, v3=v3, digits=data, keys=e2e_keys, probe=probe)
