"""claim(): the one way a chapter asserts a key claim.

A claim prints what was measured, what was expected and the tolerance, so a reader sees the evidence and
not just a silent assert; it raises AssertionError when the claim fails, so the notebook (and nbval) fails
too. Every claim is recorded in `CLAIMS`, so a chapter can list what it proved. `refute` is the negative
control: it asserts that a deliberately wrong variant does *not* meet the same tolerance.

Agreement is elementwise |measured - expected| <= atol + rtol * |expected| (NumPy's isclose), with
NaN equal to NaN. The default tolerance is exact: a floating-point claim must state its tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Claim:
    """One checked claim, as printed and recorded."""

    name: str
    measured: Any
    expected: Any
    rtol: float
    atol: float
    max_abs_error: float | None  # None for non-numeric claims, inf when shapes differ
    holds: bool  # whether measured agrees with expected within the tolerance
    negated: bool  # True for refute(): the claim is that they disagree

    @property
    def passed(self) -> bool:
        return self.holds != self.negated


CLAIMS: list[Claim] = []


def _as_array(value: Any) -> np.ndarray | None:
    """A float64 array for numeric values (tensors, arrays, numbers, nested lists), None otherwise."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    try:
        array = np.asarray(value)
    except ValueError:  # ragged, e.g. (8, ["0"]): not numeric, compared with ==
        return None
    if array.dtype.kind in "biuf":
        return array.astype(np.float64)
    return None


def _show(value: Any) -> str:
    array = _as_array(value)
    if array is None:
        return repr(value)
    is_bool = (value.dtype == torch.bool) if isinstance(value, torch.Tensor) else np.asarray(value).dtype == bool
    if is_bool:
        if array.size == 1:
            return str(bool(array.item()))
        return f"bool array of shape {tuple(array.shape)} with {int(array.sum())} True"
    if array.size <= 12:
        text = np.array2string(array, precision=7, separator=", ", suppress_small=False)
        return " ".join(text.split())
    return f"array of shape {tuple(array.shape)}, mean {array.mean():.7g}"


def _compare(measured: Any, expected: Any, rtol: float, atol: float) -> tuple[bool, float | None]:
    m, e = _as_array(measured), _as_array(expected)
    if m is None or e is None:
        return measured == expected, None
    if m.shape != e.shape:
        return False, float("inf")
    if m.size == 0:
        return True, 0.0
    same = (m == e) | (np.isnan(m) & np.isnan(e))  # equal infinities and NaN in the same place agree exactly
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(m - e))
    close = np.isclose(m, e, rtol=rtol, atol=atol, equal_nan=True)
    return bool(close.all()), float(np.nan_to_num(diff, nan=np.inf).max())


def _check(name: str, measured: Any, expected: Any, rtol: float, atol: float, negated: bool) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string saying what is claimed, got {name!r}")
    for arg, value in (("rtol", rtol), ("atol", atol)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"{arg} must be a number >= 0, got {value!r}")
    holds, max_abs_error = _compare(measured, expected, rtol, atol)
    result = Claim(name, measured, expected, float(rtol), float(atol), max_abs_error, holds, negated)
    CLAIMS.append(result)
    mark = "✓" if result.passed else "✗"
    verb = "refuted" if negated else "claim"
    tolerance = f"rtol={rtol:g}, atol={atol:g}"
    error = "" if max_abs_error is None else f", max |measured - expected| = {max_abs_error:.3g}"
    m, e = _as_array(measured), _as_array(expected)
    shape_note = " (shapes differ)" if m is not None and e is not None and m.shape != e.shape else ""
    line = (
        f"{mark} {verb}: {name}\n"
        f"    measured {_show(measured)}{shape_note}\n"
        f"    expected {_show(expected)}\n"
        f"    tolerance {tolerance}{error}"
    )
    print(line)
    if not result.passed:
        why = "they agree, but were claimed to differ" if negated else "they differ beyond the tolerance"
        raise AssertionError(f"{line}\n    {why}")


def claim(name: str, measured: Any, expected: Any, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Assert that `measured` equals `expected` within `rtol`/`atol`, print both, and record it in CLAIMS.
    Returns nothing, so a claim at the end of a notebook cell prints only its own lines."""
    _check(name, measured, expected, rtol, atol, negated=False)


def refute(name: str, measured: Any, expected: Any, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Assert that `measured` does *not* equal `expected` within the tolerance: the negative control
    that shows a claim's tolerance is tight enough to catch a wrong variant."""
    _check(name, measured, expected, rtol, atol, negated=True)
