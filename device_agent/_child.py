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


class Warm:
    """A child started ahead of its request, so that its start-up and imports (about
    0.5 s for onnxruntime or model-signing) overlap the download instead of following
    it. Each child module does its heavy imports before it reads its request.
    Used once, by :func:`call`; :meth:`close` ends a child that was never used."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.proc: subprocess.Popen[str] | None = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def take(self) -> subprocess.Popen[str] | None:
        """The waiting child (once), or None when it was taken or has died."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is not None:
            proc.communicate()
            return None
        return proc

    def close(self) -> None:
        """Kill and reap the child if nobody took it."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.communicate()


def call(
    module: str,
    prefix: str,
    request: dict[str, Any],
    timeout_s: float,
    warm: Warm | None = None,
) -> dict[str, Any]:
    """Run ``python -m module`` with ``request`` (in ``warm``'s child when it waits for
    one); return its answer.

    Raises :class:`ChildEndedError` when it printed no answer, and lets
    :class:`subprocess.TimeoutExpired` through (the child is killed first), so
    each caller words both in its own terms.
    """
    proc = warm.take() if warm is not None and warm.module == module else None
    if proc is None:
        proc = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        stdout, stderr = proc.communicate(json.dumps(request), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return _answer_of(done, prefix)


def _answer_of(proc: subprocess.CompletedProcess[str], prefix: str) -> dict[str, Any]:
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
