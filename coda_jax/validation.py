"""Checks of user-given numbers, shared by generation and the neural database:
each names the value and says what it must be."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def check_integer(name: str, value: Any, low: int, high: int | None = None, *,
                  error: type[ValueError] = ValueError) -> int:
    """``value`` as an int, after ``error`` unless it is an integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise error(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise error(f"{name} must be {span}, got {value}")
    return int(value)


def check_number(name: str, value: Any, *, error: type[ValueError] = ValueError) -> float:
    """``value`` as a float, after ``error`` unless it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise error(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise error(f"{name} must be finite, got {value}")
    return float(value)
