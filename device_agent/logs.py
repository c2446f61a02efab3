"""Logging of the agent: one line per event on stderr, in the form a supervisor keeps.

Every module logs through ``logging.getLogger(__name__)`` (all under the
``device_agent`` logger); :func:`configure` is called once by the
``edgepack-agent`` command line. When stderr is the systemd journal (the
``JOURNAL_STREAM`` variable names stderr's device and inode, as systemd sets
it for a service) each line starts with the sd-daemon priority prefix
``<N>`` and carries no timestamp or program name, which the journal adds
itself; elsewhere a line reads ``edgepack-agent: LEVEL: message``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

LOGGER_NAME = "device_agent"
PROG = "edgepack-agent"
LEVELS = ("debug", "info", "warning", "error")

# syslog priorities of sd-daemon(3): <7> debug, <6> info, <4> warning, <3> error, <2> critical
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels between two map to the more urgent)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """True when stderr is connected to the journal.

    systemd sets ``JOURNAL_STREAM=DEVICE:INODE`` for the stream it hands a
    service; a child with stderr redirected elsewhere inherits the variable,
    so it only counts when it names the stream stderr is now.
    """
    value = (environ if environ is not None else os.environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # a replaced stderr without a descriptor
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class _Formatter(logging.Formatter):
    """One line per record: newlines in a message would split it in the journal."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and self.level_shows_tracebacks(record):
            message += " | " + self.formatException(record.exc_info)
        message = " ".join(message.splitlines())
        if self.journal:
            return f"<{priority(record.levelno)}>{message}"
        return f"{PROG}: {record.levelname.lower()}: {message}"

    @staticmethod
    def level_shows_tracebacks(record: logging.LogRecord) -> bool:
        """Tracebacks only in debug output: a refusal is one line with its reason."""
        return logging.getLogger(LOGGER_NAME).getEffectiveLevel() <= logging.DEBUG


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


_handler: _StderrHandler | None = None


def level_for(verbose: int = 0, quiet: int = 0, name: str | None = None) -> int:
    """The threshold: ``name`` when given, else INFO moved one step down per ``-v``
    and one step up per ``-q`` (``-q`` silences INFO, ``-qq`` warnings too)."""
    if name is not None:
        return int(getattr(logging, name.upper()))
    level = logging.INFO - 10 * verbose + 10 * quiet
    return max(logging.DEBUG, min(logging.CRITICAL, level))


def configure(level: int = logging.INFO, environ: Mapping[str, str] | None = None) -> None:
    """Send the agent's log records at ``level`` and above to stderr (idempotent).

    python-tuf's records go the same way, below WARNING only at DEBUG.
    """
    global _handler
    logger = logging.getLogger(LOGGER_NAME)
    tuf_logger = logging.getLogger("tuf")
    if _handler is not None:
        logger.removeHandler(_handler)
        tuf_logger.removeHandler(_handler)
    _handler = _StderrHandler()
    _handler.setFormatter(_Formatter(stderr_is_journal(environ)))
    logger.addHandler(_handler)
    logger.setLevel(level)
    logger.propagate = False
    tuf_logger.addHandler(_handler)
    tuf_logger.setLevel(max(level, logging.WARNING) if level > logging.DEBUG else level)
    tuf_logger.propagate = False
