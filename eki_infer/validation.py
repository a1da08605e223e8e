"""Checks of user options, shared by the engine and the ML mode.

Counts must be integers (a float or a string is refused, not rounded or parsed), flags
must be bools (a string such as "no" is not False), step sizes finite numbers; each
error names the option and the value it got.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_count", "check_flag", "check_number", "is_real_scalar"]


def _scalar_of(value, kind: str) -> bool:
    """Whether ``value`` is a Python, NumPy or JAX scalar of the dtype kind ``kind`` ("i":
    integer, "f": any real number); bools are neither."""
    if isinstance(value, bool | np.bool_) or np.ndim(value) != 0:
        return False
    try:
        dtype = np.asarray(value).dtype
    except Exception:
        return False
    if kind == "i":
        return np.issubdtype(dtype, np.integer)
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)


def is_real_scalar(value) -> bool:
    """Whether ``value`` is a real Python, NumPy or JAX scalar (bools, strings and None
    are not): for checks whose message is their own."""
    return not isinstance(value, str) and _scalar_of(value, "f")


def check_count(
    name: str, value, minimum: int = 1, why: str = "", maximum: int | None = None
) -> None:
    """Raises a ValueError naming ``name`` unless ``value`` is an integer ≥ ``minimum``
    (Python, NumPy or JAX), and ≤ ``maximum`` where one is given."""
    integer = not isinstance(value, str) and _scalar_of(value, "i")
    if not integer or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {bound}{' ' + why if why else ''}, got {value!r}.")
    if maximum is not None and value > maximum:
        raise ValueError(
            f"{name} must be at most {maximum} (random keys are numbered by it, and higher "
            f"numbers are reserved), got {value!r}."
        )


def check_flag(name: str, value) -> None:
    """Raises a TypeError naming ``name`` unless ``value`` is a bool."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}.")


def check_number(name: str, value, positive: bool) -> None:
    """Raises a ValueError naming ``name`` unless ``value`` is a finite number, > 0 when
    ``positive`` else ≥ 0."""
    not_finite_number = not is_real_scalar(value) or not np.isfinite(value)
    if not_finite_number or (value <= 0 if positive else value < 0):
        bound = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a finite {bound} number, got {value!r}.")
