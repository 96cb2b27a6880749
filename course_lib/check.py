"""claim() and its relatives: the one way a chapter asserts a key claim.

A claim prints its evidence on one line (the measured value, and the tolerance or bound it meets, with the
margin), so a reader sees why it holds and not just a silent assert. A claim that fails prints everything
(measured, expected, tolerance, error) and raises AssertionError, so the notebook (and nbval) fails too.

- `claim(name, measured, expected, rtol, atol)`: equal within a tolerance (exact by default);
- `refute(...)`: the negative control, a deliberately wrong variant that must *not* meet the tolerance;
- `claim_at_least`, `claim_at_most`, `claim_between`: a bound, printed with its margin;
- `summary()`: ends a chapter; it keeps the latest result per claim name, so a claim broken while
  experimenting and then fixed does not block the chapter, and returns the counts the chapter asserts on.

Agreement is elementwise |measured - expected| <= atol + rtol * |expected| (NumPy's isclose), with NaN equal
to NaN and equal infinities equal. A claim whose measured and expected values are both plain booleans is a
"yes/no" claim and says so: the last resort where no number exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SHORT = 90  # characters of a claim's two values on its one line; beyond, only the measured one is shown
DETAIL = 400  # characters of each value in the report of a claim that fails
SMALL_ARRAY = 12  # elements: larger arrays are shown by shape and ends


@dataclass(frozen=True)
class Claim:
    """One checked claim, as printed and recorded."""

    name: str
    kind: str  # "equal", "differ" (refute), "at least", "at most" or "between"
    measured: Any
    expected: Any  # the expected value, or the bound(s) of a bound claim
    passed: bool
    evidence: str  # the line that was printed
    max_abs_error: float | None = None  # equality claims on numbers; inf when shapes differ
    yes_no: bool = False  # measured and expected are plain booleans

    @property
    def negated(self) -> bool:
        """A negative control: the claim is that two things differ."""
        return self.kind == "differ"


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


def _is_bool(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    return isinstance(value, (bool, np.bool_)) or np.asarray(value).dtype == bool


def _is_yes_no(measured: Any, expected: Any) -> bool:
    def scalar_bool(value: Any) -> bool:
        return isinstance(value, (bool, np.bool_)) or (
            isinstance(value, (torch.Tensor, np.ndarray)) and _is_bool(value) and value.ndim == 0
        )

    return scalar_bool(measured) and scalar_bool(expected)


def number(x: float, digits: int = 7) -> str:
    """A number as a reader wants it: integers with thousands separators, others to `digits` significant digits."""
    x = float(x)
    if math.isfinite(x) and x == round(x) and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:.{digits}g}"


def _ends(values: Any, text: Any) -> str:
    """Up to five values written with `text`; of more, the first three and the last two."""
    if len(values) <= 5:
        return ", ".join(text(v) for v in values)
    return ", ".join([*(text(v) for v in values[:3]), "…", *(text(v) for v in values[-2:])])


def _size(array: np.ndarray) -> str:
    return f"{array.size:,}" if array.ndim == 1 else str(tuple(array.shape))


def show(value: Any, width: int = 60) -> str:
    """A value in about `width` characters or fewer: small ones whole, long ones by size, start and ends."""
    array = _as_array(value)
    if array is not None:
        if _is_bool(value):
            if array.size == 1:
                return str(bool(array.item()))
            return f"bool array of shape {tuple(array.shape)} with {int(array.sum()):,} True"
        if array.ndim == 0:
            return number(array.item())
        integers = bool(np.all(np.isfinite(array))) and bool(np.all(array == np.round(array)))
        if array.size <= SMALL_ARRAY:
            shown = array.astype(np.int64) if integers and np.abs(array).max() < 1e15 else array
            text = " ".join(np.array2string(shown, precision=7, separator=", ").split())
            if len(text) <= width:
                return text
        size = f"{'length' if array.ndim == 1 else 'shape'} {_size(array)}"
        if (array == array.flat[0]).all():
            return f"all {number(array.flat[0])} ({size})"
        item = (lambda x: str(int(x))) if integers else (lambda x: f"{x:.4g}")
        return f"{size}: [{_ends(array.ravel(), item)}]"
    if isinstance(value, str):
        return repr(value) if len(value) <= width else f"{value[: width - 20]!r}… ({len(value):,} characters)"
    text = repr(value)
    if len(text) <= width:
        return text
    if isinstance(value, dict):
        items = [f"{k!r}: {v!r}"[:30] for k, v in list(value.items())[:3]]
        return f"dict of {len(value):,} items: {{{', '.join(items)}, …}}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value):,} items: [{_ends(value, lambda v: repr(v)[:30])}]"
    return text[:width] + "…"


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


def _tolerance(rtol: float, atol: float) -> str:
    if rtol == 0 and atol == 0:
        return "exact"
    parts = [f"atol {atol:g}"] * (atol > 0) + [f"rtol {rtol:g}"] * (rtol > 0)
    return " + ".join(parts)


def _name_ok(name: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string saying what is claimed, got {name!r}")


def _record(result: Claim, detail: str) -> None:
    """Record, print one line if it passed, or print the detail and raise if it did not."""
    CLAIMS.append(result)
    if result.passed:
        print(result.evidence)
        return
    print(detail)
    raise AssertionError(detail)


def _check(name: str, measured: Any, expected: Any, rtol: float, atol: float, negated: bool) -> None:
    _name_ok(name)
    for arg, value in (("rtol", rtol), ("atol", atol)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"{arg} must be a number >= 0, got {value!r}")
    holds, error = _compare(measured, expected, rtol, atol)
    passed = holds != negated
    m_text, e_text = show(measured), show(expected)
    m_full, e_full = show(measured, DETAIL), show(expected, DETAIL)
    m, e = _as_array(measured), _as_array(expected)
    shapes_differ = m is not None and e is not None and m.shape != e.shape
    yes_no = _is_yes_no(measured, expected)
    tolerance = _tolerance(rtol, atol)
    if negated:
        gap = "" if error is None else f" · max |Δ| {error:.3g} beyond {tolerance}"
        if shapes_differ:
            one_d = m.ndim == e.ndim == 1
            gap = f" · lengths {m.size:,} vs {e.size:,}" if one_d else f" · shapes {m.shape} vs {e.shape}"
        values = f"{m_text} vs {e_text}" if len(m_text) + len(e_text) <= SHORT else m_text
        evidence = f"✓ refuted: {name}: {values}{gap}"
    elif yes_no:
        evidence = f"✓ {name}: {m_text} (yes/no)"
    else:
        # one value when they print alike or are long: the error says how close they are
        short = m_text != e_text and len(m_text) + len(e_text) <= SHORT
        value = f"{m_text} vs expected {e_text}" if short else m_text
        within = "" if error is None or tolerance == "exact" else f" · max |Δ| {error:.2g} within {tolerance}"
        evidence = f"✓ {name}: {value}{within}"
    kind = "differ" if negated else "equal"
    why = "they agree, but were claimed to differ" if negated else "they differ beyond the tolerance"
    detail = (
        f"✗ {'refuted' if negated else 'claim'}: {name}\n"
        f"    measured {m_full}{' (shapes differ)' if shapes_differ else ''}\n"
        f"    expected {e_full}\n"
        f"    tolerance rtol={rtol:g}, atol={atol:g}"
        + ("" if error is None else f", max |measured - expected| = {error:.3g}")
        + f"\n    {why}"
    )
    _record(Claim(name, kind, measured, expected, passed, evidence, error, yes_no), detail)


def claim(name: str, measured: Any, expected: Any, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Assert that `measured` equals `expected` within `rtol`/`atol`, print the evidence, record it.
    Returns nothing, so a claim at the end of a notebook cell prints only its own line."""
    _check(name, measured, expected, rtol, atol, negated=False)


def refute(name: str, measured: Any, expected: Any, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Assert that `measured` does *not* equal `expected` within the tolerance: the negative control
    that shows a claim's tolerance is tight enough to catch a wrong variant."""
    _check(name, measured, expected, rtol, atol, negated=True)


def _numbers(arg: str, value: Any) -> np.ndarray:
    array = _as_array(value)
    if array is None or _is_bool(value) or array.size == 0 or np.isnan(array).any():
        raise TypeError(f"{arg} must be a number or an array of numbers (no NaN, not booleans), got {show(value)}")
    return array


def _bound(name: str, measured: Any, low: Any, high: Any) -> None:
    _name_ok(name)
    both = low is not None and high is not None
    names = {"low": "low" if both else "bound", "high": "high" if both else "bound"}
    m = _numbers("measured", measured)
    lo = None if low is None else _numbers(names["low"], low)
    hi = None if high is None else _numbers(names["high"], high)
    for arg, bound in ((names["low"], lo), (names["high"], hi)):
        if bound is not None and bound.size > 1 and bound.shape != m.shape:
            raise ValueError(f"{arg} must be a number or have measured's shape {m.shape}, got shape {bound.shape}")
    if both and (lo > hi).any():
        raise ValueError(f"low must not exceed high, got low {show(low)} and high {show(high)}")
    above = None if lo is None else m - lo  # margins: >= 0 where the bound holds
    below = None if hi is None else hi - m
    passed = all(margin is None or bool((margin >= 0).all()) for margin in (above, below))
    if both:
        kind, expected, relation = "between", (low, high), f"in [{show(low)}, {show(high)}]"
        margins = f"margins {number(above.min(), 4)} below, {number(below.min(), 4)} above"
    elif lo is not None:
        kind, expected, relation = "at least", low, f"≥ {show(low)}"
        margins = f"margin {number(above.min(), 4)}"
    else:
        kind, expected, relation = "at most", high, f"≤ {show(high)}"
        margins = f"margin {number(below.min(), 4)}"
    if m.size == 1:
        evidence = f"✓ {name}: {number(m.item())} {relation} ({margins})"
    else:
        extent = {"at least": f"smallest {number(m.min())}", "at most": f"largest {number(m.max())}",
                  "between": f"from {number(m.min())} to {number(m.max())}"}[kind]
        evidence = f"✓ {name}: all {m.size:,} values {relation} ({extent}, {margins})"
    detail = (f"✗ claim: {name}\n    measured {show(measured, DETAIL)}\n    bound: {kind} {show(expected, DETAIL)}\n"
              f"    {margins}: the bound does not hold")
    _record(Claim(name, kind, measured, expected, passed, evidence), detail)


def claim_at_least(name: str, measured: Any, bound: Any) -> None:
    """Assert measured >= bound (every element), and print the value, the bound and the margin."""
    _bound(name, measured, bound, None)


def claim_at_most(name: str, measured: Any, bound: Any) -> None:
    """Assert measured <= bound (every element), and print the value, the bound and the margin."""
    _bound(name, measured, None, bound)


def claim_between(name: str, measured: Any, low: Any, high: Any) -> None:
    """Assert low <= measured <= high (every element), and print the value, the bounds and both margins."""
    _bound(name, measured, low, high)


@dataclass(frozen=True)
class Summary:
    """What a chapter proved: its claims (the latest result under each name) and how many are negative controls,
    so that the chapter can assert it refuted at least one wrong variant."""

    claims: int
    negatives: int


def summary() -> Summary:
    """End a chapter: one line if every claim holds (the latest result under each name), else raise with
    the names of those that do not."""
    latest = {c.name: c for c in CLAIMS}
    if not latest:
        raise AssertionError("no claims were recorded: run the chapter from the top")
    failed = [name for name, c in latest.items() if not c.passed]
    if failed:
        raise AssertionError(f"{len(failed)} of {len(latest)} claims do not hold: {'; '.join(failed)}")
    negatives = sum(c.negated for c in latest.values())
    print(f"{len(latest)} claims, all hold ({negatives} of them negative controls)")
    return Summary(len(latest), negatives)
