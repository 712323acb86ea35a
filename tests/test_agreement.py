"""eval/agreement.py: the Wilson interval, the agreement measures (JSON field by field
included) and calibrate's recommendation rule, on hand-computed cases."""

import math

import pytest

from hired_batch.eval.agreement import (
    Candidate,
    agreement,
    field_agreement,
    leaves,
    parse_json_answer,
    recommend,
    wilson,
)


@pytest.mark.parametrize(
    "k, n, low, high",
    [
        (5, 10, 0.2366, 0.7634),  # p = 0.5: symmetric
        (0, 10, 0.0, 0.2775),  # z^2 / (n + z^2)
        (10, 10, 0.7225, 1.0),
        (95, 100, 0.8883, 0.9785),
        (1, 1, 0.2065, 1.0),
    ],
)
def test_wilson_against_hand_computed_intervals(k, n, low, high):
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=5e-4) and hi == pytest.approx(high, abs=5e-4)


def test_wilson_of_nothing_is_the_whole_range():
    assert wilson(0, 0) == (0.0, 1.0)


def test_agreement_measures_on_known_rows():
    reference = {"a": "Two cats.", "b": "red", "c": "12345", "d": None}  # d: full failed, left out
    answers = {"a": "two cats", "b": "blue", "c": "12346", "d": "x"}
    got = agreement(answers, reference)
    assert got["exact"].n == 3 and got["exact"].value == pytest.approx(1 / 3)  # VQA-normalised: a only
    # ANLS (raw lengths): a 1 - 1/9 (the period), b 0 (below 0.5), c 1 - 1/5
    assert got["anls"].value == pytest.approx((1 - 1 / 9 + 0.0 + 0.8) / 3)
    assert got["fields"] is None  # no JSON reference
    assert got["exact"].low < got["exact"].value < got["exact"].high


def test_a_failed_row_disagrees():
    got = agreement({"a": None, "b": "yes"}, {"a": "yes", "b": "yes"})
    assert got["exact"].value == 0.5 and got["anls"].value == 0.5


def test_identical_answers_agree_fully():
    rows = {str(i): f"answer {i}" for i in range(40)}
    got = agreement(dict(rows), rows)
    assert got["exact"].value == 1.0 and got["anls"].value == 1.0
    assert got["exact"].low == pytest.approx(wilson(40, 40)[0])


def test_json_answers_compare_field_by_field():
    ref = '{"label": "Cat", "count": 2, "tags": ["a", "b"], "box": {"x": 1.0}}'
    assert leaves(parse_json_answer(ref)) == {"label": "Cat", "count": 2, "tags[0]": "a", "tags[1]": "b", "box.x": 1.0}
    # label agrees after normalisation, count differs, tags[1] differs, box.x equal as a number
    answer = '```json\n{"label": "cat.", "count": 3, "tags": ["a", "c"], "box": {"x": 1}}\n```'
    assert field_agreement(answer, ref) == (3, 5)
    assert field_agreement("not json", ref) == (0, 5)  # an unparsable answer agrees on none
    assert field_agreement(ref, ref) == (5, 5)
    assert field_agreement("a cat", "a cat") is None  # not a constrained answer
    got = agreement({"1": answer, "2": ref}, {"1": ref, "2": ref})
    assert got["fields"].n == 10 and got["fields"].value == pytest.approx(8 / 10)


def test_booleans_are_not_numbers_in_fields():
    assert field_agreement('{"ok": 1}', '{"ok": true}') == (0, 1)
    assert field_agreement('{"ok": true}', '{"ok": true}') == (1, 1)


def _c(setting, cost, speed, low):
    return Candidate(setting, cost, speed, low)


def test_recommends_the_cheapest_setting_that_meets_the_target():
    table = [
        _c("full", 10.0, 1.0, 1.0),
        _c("hired:0.1", 2.0, 5.0, 0.80),  # cheapest, but below the target
        _c("hired:0.2", 3.0, 4.0, 0.96),
        _c("hired:0.5", 6.0, 2.0, 0.99),
    ]
    assert recommend(table, 0.95) == ("hired:0.2", True)
    assert recommend(table, 0.97) == ("hired:0.5", True)
    assert recommend(table, 0.80) == ("hired:0.1", True)  # the bound meets the target exactly


def test_recommendation_ties_go_to_the_faster_then_the_surer_then_the_first():
    tied = [_c("full", 9, 1, 1), _c("random:0.2", 3, 2.0, 0.97), _c("hired:0.2", 3, 2.5, 0.96)]
    assert recommend(tied, 0.95) == ("hired:0.2", True)  # same cost: faster measured
    tied = [_c("full", 9, 1, 1), _c("random:0.2", 3, 2.0, 0.96), _c("hired:0.2", 3, 2.0, 0.97)]
    assert recommend(tied, 0.95) == ("hired:0.2", True)  # same cost and speed: the better bound
    tied = [_c("full", 9, 1, 1), _c("spatial:0.2", 3, 2.0, 0.97), _c("hired:0.2", 3, 2.0, 0.97)]
    assert recommend(tied, 0.95) == ("spatial:0.2", True)  # all equal: the order of --try


def test_recommends_full_when_none_meets_the_target():
    table = [_c("full", 10, 1, 1.0), _c("hired:0.2", 3, 4, 0.90), _c("hired:0.5", 6, 2, 0.94)]
    assert recommend(table, 0.95) == ("full", False)
    # an unknown cost (NaN) ranks last among those that pass, but still passes
    table = [_c("full", 10, 1, 1.0), _c("hired:0.2", math.nan, 4, 0.99), _c("hired:0.5", 6, 2, 0.99)]
    assert recommend(table, 0.95) == ("hired:0.5", True)
