"""One request, one answer: a ``device_agent`` module run as a short-lived child process.

The health check and the producer-signature check run in children so that what
they import (onnxruntime, numpy, model-signing) never stays in the daemon, and so
that a model or a signature that crashes its parser cannot crash the agent. Both
speak the same small protocol: the request as JSON on stdin, the answer as one
line ``PREFIX + JSON`` on stdout (anything else the child prints is ignored).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any


class ChildEndedError(Exception):
    """The child ended without an answer; ``why`` says how ("exited 1 (…)", "was killed by SIGKILL")."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def call(module: str, prefix: str, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run ``python -m module`` with ``request``; return its answer.

    Raises :class:`ChildEndedError` when it printed no answer, and lets
    :class:`subprocess.TimeoutExpired` through (the child is killed first), so
    each caller words both in its own terms.
    """
    proc = subprocess.run(
        [sys.executable, "-m", module],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(prefix):
            answer: dict[str, Any] = json.loads(line[len(prefix) :])
            return answer
    if proc.returncode < 0:
        why = f"was killed by {signal.Signals(-proc.returncode).name}"
    else:
        why = f"exited {proc.returncode}"
    tail = proc.stderr.strip().splitlines()[-1:] or [""]
    raise ChildEndedError(why + (f" ({tail[0][:300]})" if tail[0] else ""))


def request() -> dict[str, Any]:
    """In the child: the request the parent sent."""
    doc: dict[str, Any] = json.loads(sys.stdin.read())
    return doc


def answer(prefix: str, result: dict[str, Any]) -> None:
    """In the child: send the one answer line."""
    sys.stdout.write(prefix + json.dumps(result) + "\n")
    sys.stdout.flush()
