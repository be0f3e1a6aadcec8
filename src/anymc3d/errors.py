"""One exception type for user-facing input problems.

The CLI turns an ``InputError`` into a single line on stderr and exit code 2 (no traceback),
so every reader/validator raises it with the offending file named in the message.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input (file, array, column, weights). The message must name the file and the problem."""
