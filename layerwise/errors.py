"""The one exception type the CLI turns into a one-line error message."""


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
