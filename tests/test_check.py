import math

import numpy as np
import pytest
import torch

from course_lib.check import CLAIMS, claim, refute


def test_claim_passes_within_tolerance_prints_and_records(capsys):
    before = len(CLAIMS)
    claim("sum of weights", torch.tensor([1.0, 1.0 + 1e-7], dtype=torch.float64), [1.0, 1.0], atol=1e-6)
    out = capsys.readouterr().out
    result = CLAIMS[-1]
    assert result.passed and result.max_abs_error == pytest.approx(1e-7, rel=1e-2)
    assert "✓ claim: sum of weights" in out and "atol=1e-06" in out and "measured" in out and "expected" in out
    assert result.name == "sum of weights" and len(CLAIMS) == before + 1


def test_claim_fails_beyond_tolerance_with_both_numbers():
    with pytest.raises(AssertionError, match=r"differ beyond the tolerance") as info:
        claim("pi", 3.14, math.pi, atol=1e-3)
    assert "3.14" in str(info.value) and "3.1415927" in str(info.value)


def test_claim_is_exact_by_default():
    claim("count", 15, 15)
    with pytest.raises(AssertionError):
        claim("almost", 1.0 + 1e-12, 1.0)


def test_claim_rtol_scales_with_the_expected_value():
    claim("big", 1000.5, 1000.0, rtol=1e-3)
    with pytest.raises(AssertionError):
        claim("small", 1.5, 1.0, rtol=1e-3)


def test_claim_shape_mismatch_fails_rather_than_broadcasting():
    with pytest.raises(AssertionError, match="shapes differ"):
        claim("rows", np.ones(3), np.ones((3, 1)), atol=1.0)


def test_claim_treats_nan_as_equal_to_nan():
    claim("empty row gives NaN", torch.tensor([float("nan"), 1.0]), [float("nan"), 1.0])


def test_claim_compares_non_numeric_values_exactly():
    claim("order", ["F0", "F1", "B0"], ["F0", "F1", "B0"])
    with pytest.raises(AssertionError):
        claim("order", ["F0", "B0"], ["B0", "F0"])


def test_refute_is_the_negative_control():
    refute("wrong axis breaks row sums", torch.tensor([0.5, 1.5]), [1.0, 1.0], atol=1e-6)
    assert CLAIMS[-1].negated and CLAIMS[-1].passed and not CLAIMS[-1].holds
    with pytest.raises(AssertionError, match="claimed to differ"):
        refute("identical", 1.0, 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"rtol": -1}, "rtol must be"), ({"atol": float("nan")}, "atol must be")]
)
def test_claim_rejects_bad_tolerances(kwargs, message):
    with pytest.raises(ValueError, match=message):
        claim("x", 1.0, 1.0, **kwargs)


def test_claim_needs_a_name():
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        claim("  ", 1, 1)


def test_failed_claims_are_recorded_too():
    with pytest.raises(AssertionError):
        claim("recorded failure", 1.0, 2.0)
    assert CLAIMS[-1].name == "recorded failure" and not CLAIMS[-1].passed


def test_bool_claims_print_readably(capsys):
    claim("nearly one-hot", np.float64(0.95) > 0.9, True)
    claim("mask positions", torch.ones(4, 5, dtype=torch.bool), torch.ones(4, 5, dtype=torch.bool))
    out = capsys.readouterr().out
    assert "measured True" in out and "bool array of shape (4, 5) with 20 True" in out


def test_equal_infinities_agree_and_opposite_ones_do_not(capsys):
    claim("overflow gives inf", float("inf"), float("inf"))
    printed = capsys.readouterr().out
    assert "max |measured - expected| = 0" in printed and "shapes differ" not in printed
    with pytest.raises(AssertionError, match="differ beyond the tolerance"):
        claim("signs of infinity", [float("inf")], [float("-inf")])


def test_ragged_values_compare_exactly_instead_of_crashing():
    claim("a count and a list", (8, ["0"]), (8, ["0"]))
    with pytest.raises(AssertionError):
        claim("a count and a list", (8, ["0"]), (8, ["1"]))
