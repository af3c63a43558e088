"""The one exception type brickwork raises for problems a user can fix."""

from __future__ import annotations


class BrickworkError(ValueError):
    """Bad input or a missing asset; the message says what to do about it."""
