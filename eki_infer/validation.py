"""Checks of user options, shared by the engine and the ML mode.

Counts must be integers (a float or a string is refused, not rounded or parsed), flags
must be bools (a string such as "no" is not False), step sizes finite numbers; each
error names the option and the value it got.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_count", "check_flag", "check_number"]


def check_count(name: str, value, minimum: int = 1, why: str = "") -> None:
    """Raises a ValueError naming ``name`` unless ``value`` is an integer ≥ ``minimum``."""
    integer = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    if not integer or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {bound}{' ' + why if why else ''}, got {value!r}.")


def check_flag(name: str, value) -> None:
    """Raises a TypeError naming ``name`` unless ``value`` is a bool."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}.")


def check_number(name: str, value, positive: bool) -> None:
    """Raises a ValueError naming ``name`` unless ``value`` is a finite number, > 0 when
    ``positive`` else ≥ 0."""
    ok = isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_)
    if not ok or not np.isfinite(value) or (value <= 0 if positive else value < 0):
        bound = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a finite {bound} number, got {value!r}.")
