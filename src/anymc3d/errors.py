"""One exception type for user-facing input problems.

The CLI turns an ``InputError`` into a single line on stderr and exit code 2 (no traceback),
so every reader/validator raises it with the offending file named in the message.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input (file, array, column, weights). The message must name the file and the problem."""


def input_warning(meta: dict, path, cause: str) -> str:
    """Record a warning about an input and tell the user: one line on stderr, one string in ``meta``.

    ``meta`` is the volume's meta dict; its ``"warnings"`` list travels into the prediction JSON.
    The stderr line is ``anymc3d: warning: <file>: <cause>`` (no Python ``warnings`` machinery, so
    no source line and no filtering surprises).
    """
    import sys

    text = f"{path}: {' '.join(str(cause).split())}"
    meta.setdefault("warnings", []).append(text)
    print(f"anymc3d: warning: {text}", file=sys.stderr)
    return text
