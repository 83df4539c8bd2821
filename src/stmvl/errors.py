"""Errors that are the user's to fix (a bad path, value or combination): commands print them as one line and exit
with code 2. Anything else is a bug in stmvl and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input; the message names the file, record or key and what to do."""


class MissingPathsError(UserError):
    """Paths that a recipe names do not exist; the message lists every one of them."""


class CorruptWeightsError(UserError):
    """A weights file that cannot be read (truncated, overwritten, another format); the message names the file."""
