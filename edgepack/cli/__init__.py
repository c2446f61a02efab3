"""The ``edgepack`` command line: builder, repository and operator commands.

Each command group lives in its own module with a ``register(app)`` function;
``main()`` is the one place that turns an :class:`~edgepack.errors.EdgepackError`
into one line on stderr and a meaningful exit code.
"""

from __future__ import annotations

import sys

from edgepack._cli_output import new_app, run_cli
from edgepack.cli import _audit, _build, _bundle, _fleet, _hw, _keys, _repo

app = new_app("edgepack", "Build, sign, encrypt and publish ML models for edge fleets.")

for _module in (_keys, _bundle, _build, _hw, _repo, _fleet, _audit):
    _module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edgepack`` console script."""
    code = run_cli(app, "edgepack", argv if argv is not None else sys.argv[1:])
    if argv is None:
        sys.exit(code)
    return code
