"""The one exception type that means "the user can fix this": the CLI prints it in one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad recipe, bad data, a missing model or path: anything the user fixes by editing their inputs.

    The message is the whole story (file, line or key, and how to fix it); the CLI prints it without a
    traceback.
    """


class TrainingStopped(Exception):
    """The run stopped before the end on purpose (a signal, a non-finite loss); `code` is the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def first_line(exc: BaseException | None) -> str:
    """A library exception's first line: the part a user can act on, without its stack of context."""
    if exc is None:
        return "no reason given"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
