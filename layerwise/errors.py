"""The one exception type the CLI turns into a one-line error message, and the bounded repr its messages use."""

from __future__ import annotations

import reprlib
from typing import Any


class LayerwiseError(Exception):
    """A problem the user can fix: bad input, a bad config, a clash with an existing run.

    The message names the problem and the fix in one line. The CLI prints it as `error: ...`
    and exits with status 2; library callers can catch it like any exception.
    """


def one_line(exc: BaseException) -> str:
    """The user-facing line of an exception.

    A LayerwiseError raised inside a DataLoader worker comes back with the worker's traceback
    folded into its message; its last line is the original message.
    """
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    prefix = "layerwise.errors.LayerwiseError: "
    return last[len(prefix) :] if last.startswith(prefix) else (lines[0] if len(lines) == 1 else last)


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel = 2
_BRIEF.maxdict = _BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxset = _BRIEF.maxfrozenset = 4
_BRIEF.maxstring = _BRIEF.maxother = 60
_BRIEF.maxlong = 40


def brief(value: Any, width: int = 120) -> str:
    """repr(value) cut to at most `width` characters for an error message: 4 items of a list or mapping, 2 levels
    deep, 60 characters of a string. It reads no more of the value than it shows, so a huge value from a file
    costs nothing to name."""
    try:
        text = _BRIEF.repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"<an int of {value.bit_length()} bits>" if isinstance(value, int) else f"<{type(value).__name__}>"
    return text if len(text) <= width else text[: width - 3] + "..."
