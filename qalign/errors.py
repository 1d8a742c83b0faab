"""The one exception type that means "the user can fix this": the CLI prints it in one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad recipe, bad data, a missing model or path: anything the user fixes by editing their inputs.

    The message is the whole story (file, line or key, and how to fix it); the CLI prints it without a
    traceback.
    """
