"""Fuzz target: the agent's journal reader (``DATA/state.json``).

Entry point: :meth:`device_agent.state.Journal.read_file` (the strict reader under
``Journal.load``, which recovers from what it refuses) on a data directory whose
``state.json`` holds the input (a journal torn by a bad disk, or edited by
hand), then the bookkeeping the agent does on start-up. Accepted outcomes:
success, or :class:`~device_agent.state.JournalError`. Anything else is a
finding, and so is a journal that loads with fields of the wrong type or that
does not survive being saved and loaded again.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext

import atheris  # type: ignore[import-untyped]  # ships no type hints

from tests.fuzz._common import INSTRUMENTED, reread, run_fuzzer, scratch_dir

# Instrument only when fuzzing: a test importing this module runs the code plain.
with atheris.instrument_imports(include=INSTRUMENTED) if __name__ == "__main__" else nullcontext():
    from device_agent import state

EXPECTED: tuple[type[Exception], ...] = (state.JournalError,)
_DATA = scratch_dir()
_AGAIN = scratch_dir()


# The declared types of the journal's records (``from __future__`` keeps them as text).
_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "str | None": (str, type(None)),
    "int": int,
    "float": (int, float),
    "bool": bool,
}


def _check_types(journal: state.Journal) -> None:
    for name, mj in journal.models.items():
        if not isinstance(name, str) or not isinstance(mj.state, state.State):
            raise AssertionError("a model's name or state has the wrong type")
        records: list[state.Update | state.Revision] = [*mj.revisions.values()]
        if mj.update is not None:
            records.append(mj.update)
        for record in records:
            for f in dataclasses.fields(record):
                value = getattr(record, f.name)
                wanted = _TYPES[str(f.type)]
                if not isinstance(value, wanted) or (f.type != "bool" and isinstance(value, bool)):
                    raise AssertionError(f"journal field {f.name} is {type(value).__name__}")
        mj.healthy_revisions()
        mj.revision_for("0" * 64)


def one_input(data: bytes) -> None:
    """Load ``data`` as ``state.json``; raise only :data:`EXPECTED`."""
    (_DATA / state.JOURNAL_NAME).write_bytes(data)
    journal = state.Journal.read_file(_DATA / state.JOURNAL_NAME)
    _check_types(journal)
    document = json.dumps(journal._document(), allow_nan=False, sort_keys=True)
    (_AGAIN / state.JOURNAL_NAME).write_text(document)
    again = reread(state.Journal.read_file, _AGAIN / state.JOURNAL_NAME, EXPECTED)
    if json.dumps(again._document(), sort_keys=True) != document:
        raise AssertionError("the journal does not survive save and load")


def main() -> None:
    """Run libFuzzer with the command line's flags and corpus directories."""
    run_fuzzer(one_input, EXPECTED)


if __name__ == "__main__":
    main()
