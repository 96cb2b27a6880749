import math

import numpy as np
import pytest
import torch

from course_lib import check
from course_lib.check import CLAIMS, claim, claim_at_least, claim_at_most, claim_between, refute, show, summary


@pytest.fixture
def fresh_claims(monkeypatch):
    """summary() reads every claim of the session; these tests give it a list of their own."""
    claims = []
    monkeypatch.setattr(check, "CLAIMS", claims)
    return claims


def test_claim_that_holds_prints_one_line_with_its_value_and_error(capsys):
    before = len(CLAIMS)
    claim("sum of weights", torch.tensor([1.0, 1.0 + 1e-7], dtype=torch.float64), [1.0, 1.0], atol=1e-6)
    out = capsys.readouterr().out
    result = CLAIMS[-1]
    assert result.passed and result.max_abs_error == pytest.approx(1e-7, rel=1e-2)
    assert out == "✓ sum of weights: [1. , 1.0000001] vs expected [1, 1] · max |Δ| 1e-07 within atol 1e-06\n"
    assert result.name == "sum of weights" and len(CLAIMS) == before + 1


def test_claim_that_fails_prints_and_raises_with_both_numbers_and_the_tolerance(capsys):
    with pytest.raises(AssertionError, match=r"differ beyond the tolerance") as info:
        claim("pi", 3.14, math.pi, atol=1e-3)
    assert "3.14" in str(info.value) and "3.141593" in str(info.value) and "atol=0.001" in str(info.value)
    assert capsys.readouterr().out.startswith("✗ claim: pi\n    measured 3.14\n")


def test_claim_is_exact_by_default(capsys):
    claim("count", 124_439_808, 124_439_808)
    assert capsys.readouterr().out == "✓ count: 124,439,808\n"
    with pytest.raises(AssertionError):
        claim("almost", 1.0 + 1e-12, 1.0)


def test_claim_rtol_scales_with_the_expected_value():
    claim("big", 1000.5, 1000.0, rtol=1e-3)
    with pytest.raises(AssertionError):
        claim("small", 1.5, 1.0, rtol=1e-3)


def test_claim_shape_mismatch_fails_rather_than_broadcasting():
    with pytest.raises(AssertionError, match="shapes differ"):
        claim("rows", np.ones(3), np.ones((3, 1)), atol=1.0)


def test_a_refute_of_different_shapes_says_so(capsys):
    refute("encoded without the special token", list(range(870)), list(range(864)))
    assert capsys.readouterr().out.endswith("· lengths 870 vs 864\n")


def test_claim_treats_nan_as_equal_to_nan():
    claim("empty row gives NaN", torch.tensor([float("nan"), 1.0]), [float("nan"), 1.0])


def test_claim_compares_non_numeric_values_exactly():
    claim("order", ["F0", "F1", "B0"], ["F0", "F1", "B0"])
    with pytest.raises(AssertionError):
        claim("order", ["F0", "B0"], ["B0", "F0"])


def test_refute_is_the_negative_control_and_prints_the_gap(capsys):
    refute("wrong axis breaks row sums", torch.tensor([0.5, 1.5]), [1.0, 1.0], atol=1e-6)
    assert CLAIMS[-1].negated and CLAIMS[-1].passed
    assert capsys.readouterr().out == (
        "✓ refuted: wrong axis breaks row sums: [0.5, 1.5] vs [1, 1] · max |Δ| 0.5 beyond atol 1e-06\n"
    )
    with pytest.raises(AssertionError, match="claimed to differ"):
        refute("identical", 1.0, 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"rtol": -1}, "rtol must be"), ({"atol": float("nan")}, "atol must be")]
)
def test_claim_rejects_bad_tolerances(kwargs, message):
    with pytest.raises(ValueError, match=message):
        claim("x", 1.0, 1.0, **kwargs)


@pytest.mark.parametrize("call", [claim, claim_at_least])
def test_claims_need_a_name(call):
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        call("  ", 1, 1)


def test_failed_claims_are_recorded_too():
    with pytest.raises(AssertionError):
        claim("recorded failure", 1.0, 2.0)
    assert CLAIMS[-1].name == "recorded failure" and not CLAIMS[-1].passed


def test_a_plain_boolean_claim_says_it_is_yes_no(capsys):
    claim("nearly one-hot", np.float64(0.95) > 0.9, True)
    assert capsys.readouterr().out == "✓ nearly one-hot: True (yes/no)\n" and CLAIMS[-1].yes_no


def test_a_boolean_array_is_evidence_not_a_yes_no(capsys):
    claim("mask positions", torch.ones(4, 5, dtype=torch.bool), torch.ones(4, 5, dtype=torch.bool))
    assert "bool array of shape (4, 5) with 20 True" in capsys.readouterr().out and not CLAIMS[-1].yes_no


def test_equal_infinities_agree_and_opposite_ones_do_not(capsys):
    claim("overflow gives inf", float("inf"), float("inf"))
    assert capsys.readouterr().out == "✓ overflow gives inf: inf\n"
    with pytest.raises(AssertionError, match="differ beyond the tolerance"):
        claim("signs of infinity", [float("inf")], [float("-inf")])


def test_ragged_values_compare_exactly_instead_of_crashing():
    claim("a count and a list", (8, ["0"]), (8, ["0"]))
    with pytest.raises(AssertionError):
        claim("a count and a list", (8, ["0"]), (8, ["1"]))


def test_long_values_are_summarised_by_size_start_and_ends():
    play = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
    assert show(play) == f"{play[:40]!r}… (2,440 characters)"
    vocabulary = {chr(97 + i % 26) * (1 + i // 26): i for i in range(276)}
    assert show(vocabulary) == "dict of 276 items: {'a': 0, 'b': 1, 'c': 2, …}"
    assert show(list(range(1000))) == "length 1,000: [0, 1, 2, …, 998, 999]"
    assert show([4805, 33460, *range(900)]) == "length 902: [4805, 33460, 0, …, 898, 899]"
    assert show(np.arange(6.0)) == "[0, 1, 2, 3, 4, 5]" and show([0.5, 1.5]) == "[0.5, 1.5]"
    assert show(torch.zeros(4, 5)) == "all 0 (shape (4, 5))"
    assert show(torch.arange(20.0).reshape(4, 5)) == "shape (4, 5): [0, 1, 2, …, 18, 19]"
    assert show([str(i) for i in range(300)]) == "list of 300 items: ['0', '1', '2', …, '298', '299']"


def test_a_claim_on_long_values_stays_one_short_line(capsys):
    play = "To be, or not to be, that is the question. " * 50
    claim("the round trip gives the play back", play, play)
    claim("a long array", torch.arange(1000.0), torch.arange(1000.0) + 1e-9, atol=1e-6)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(len(line) < 200 for line in lines)
    assert "(2,150 characters)" in lines[0] and "max |Δ| 1e-09 within atol 1e-06" in lines[1]


def test_bounds_print_the_value_the_bound_and_the_margin(capsys):
    claim_at_least("largest weight", 0.945, 0.9)
    claim_at_most("jacobian", 0.0515, 0.0612)
    claim_between("compression", 4.2, 4, 4.5)
    claim_at_least("speed-ups", np.array([2.1, 3.5, 4.0]), 2)
    assert capsys.readouterr().out.splitlines() == [
        "✓ largest weight: 0.945 ≥ 0.9 (margin 0.045)",
        "✓ jacobian: 0.0515 ≤ 0.0612 (margin 0.0097)",
        "✓ compression: 4.2 in [4, 4.5] (margins 0.2 below, 0.3 above)",
        "✓ speed-ups: all 3 values ≥ 2 (smallest 2.1, margin 0.1)",
    ]
    assert [c.kind for c in CLAIMS[-4:]] == ["at least", "at most", "between", "at least"]


@pytest.mark.parametrize(
    ("call", "args"),
    [(claim_at_least, (0.85, 0.9)), (claim_at_most, (3, 2)), (claim_between, (4.6, 4, 4.5)),
     (claim_at_least, ([2.1, 1.9], 2))],
)
def test_a_bound_that_does_not_hold_fails_with_its_negative_margin(call, args):
    with pytest.raises(AssertionError, match=r"-\d[\d.]*( above)?: the bound does not hold"):
        call("bounded", *args)
    assert not CLAIMS[-1].passed


def test_a_bound_that_is_met_exactly_holds():
    claim_at_most("in flight", 2, 2)


def test_bounds_compare_elementwise_with_bounds_of_the_same_shape():
    claim_at_most("each below its own bound", [1, 2, 3], [1, 2, 3])
    with pytest.raises(AssertionError):
        claim_at_most("each below its own bound", [1, 2, 3], [1, 2, 2.5])


@pytest.mark.parametrize(
    ("call", "args", "error", "message"),
    [
        (claim_at_least, (True, 1), TypeError, "measured must be a number"),
        (claim_at_least, ("fast", 1), TypeError, "measured must be a number"),
        (claim_at_most, (1.0, float("nan")), TypeError, "bound must be a number"),
        (claim_at_least, ([1, 2], [1, 2, 3]), ValueError, r"bound must be a number or have measured's shape \(2,\)"),
        (claim_between, (1, 2, 1), ValueError, "low must not exceed high"),
    ],
)
def test_bounds_reject_what_is_not_a_number(call, args, error, message):
    with pytest.raises(error, match=message):
        call("x", *args)


def test_summary_counts_the_latest_result_of_each_claim(fresh_claims, capsys):
    claim("a", 1, 1)
    refute("b", 1.0, 2.0)
    claim_at_least("c", 3, 2)
    report = summary()
    assert capsys.readouterr().out.splitlines()[-1] == "3 claims, all hold (1 of them negative controls)"
    assert (report.claims, report.negatives) == (3, 1)


def test_summary_forgives_a_claim_broken_and_then_fixed(fresh_claims, capsys):
    with pytest.raises(AssertionError):
        claim("experiment", 1, 2)
    claim("experiment", 2, 2)
    summary()
    assert capsys.readouterr().out.splitlines()[-1] == "1 claims, all hold (0 of them negative controls)"


def test_summary_names_the_claims_that_do_not_hold(fresh_claims):
    claim("fine", 1, 1)
    with pytest.raises(AssertionError):
        claim_at_most("too slow", 3, 2)
    with pytest.raises(AssertionError, match="1 of 2 claims do not hold: too slow"):
        summary()


def test_summary_without_claims_says_to_run_the_chapter(fresh_claims):
    with pytest.raises(AssertionError, match="no claims were recorded"):
        summary()
