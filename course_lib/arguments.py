"""Checks on arguments that many `course_lib` functions share, each raising an error that names the argument."""

from __future__ import annotations


def positive_int(name: str, value: object) -> int:
    """`value` if it is an int of at least 1 (a bool is not a count); otherwise a ValueError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
