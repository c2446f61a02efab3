"""Crash injection for the crash-safety harness (tests only).

``EDGEPACK_AGENT_CRASH_AT=<name>:<n>`` makes the n-th (1-based) call of
``crashpoint(<name>)`` kill the process with SIGKILL; ``any:<n>`` counts every
crash point. Unset, a crash point costs one dictionary lookup. The variable is
read once at import, so a production agent cannot be made to crash later.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("EDGEPACK_AGENT_CRASH_AT", "")
_NAME, _, _COUNT = _SPEC.partition(":")
_TARGET = int(_COUNT) if _COUNT.isdigit() else 0
_seen = 0


def arm(spec: str) -> None:
    """Set the crash spec in a process started without the variable (the harness's forked runs)."""
    global _NAME, _TARGET, _seen
    name, _, count = spec.partition(":")
    _NAME, _TARGET, _seen = name, int(count) if count.isdigit() else 0, 0


_with_parent = False


def kill_parent_too() -> None:
    """In a child the agent waits on (the health check): a crash here is a power cut, so it
    kills the agent that started the child as well as the child."""
    global _with_parent
    _with_parent = True


def crashpoint(name: str) -> None:
    """Die here with SIGKILL when the harness asked for it."""
    global _seen  # one process-wide counter is the point
    if not _TARGET or (_NAME not in (name, "any")):
        return
    _seen += 1
    if _seen == _TARGET:
        if _with_parent:
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
