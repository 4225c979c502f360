"""User-facing input errors.

An `InputError` carries one line that names the offending input and says how to fix it. The CLI turns it into
that line on stderr and exit code 2; library callers get an ordinary `ValueError` subclass.
"""

from __future__ import annotations

import numbers


class InputError(ValueError):
    """Bad input from the user: the message names the input and the fix, in one line."""

    def __init__(self, what: str, problem: str, fix: str):
        self.what, self.problem, self.fix = what, problem, fix
        super().__init__(f"{what}: {problem} — {fix}")


def is_integer(x) -> bool:
    """An integer value as inputs name counts, layers, seeds and indices: a Python or numpy integer, not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
