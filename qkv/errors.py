"""The one exception type for a user's mistake (a bad config key, a missing file, a damaged input).

``qkv`` prints a ``UserError`` as one ``qkv: error:`` line and exits 2. Anything else that escapes is a
bug in qkv: the CLI says so in one line, writes the traceback to a file and exits 1. ``UserError`` is a
``ValueError`` so that callers (and tests) that catch ``ValueError`` keep working.

This module imports nothing, so every room (model/, data/, train/, ...) may raise it.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: the message names the problem (the config key, file and line) and the fix."""
