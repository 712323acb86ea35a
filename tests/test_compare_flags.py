"""The engine comparison's workloads (``hired_batch.bench.compare_flags``); its flag checks
run through the CLI in test_bench.py."""

import pytest

from hired_batch.bench.compare_flags import Workload


@pytest.mark.parametrize(
    "lengths, answer_len, limits", [("fixed", None, (8, 8)), ("eos", None, (8, 0)), ("drawn", 5, (5, 5))]
)
def test_workload_limits_per_item(lengths, answer_len, limits):
    """(max, min) new tokens of an item: fixed suppresses EOS, eos stops there, drawn forces
    the item's own length (both engines decode from these)."""
    assert Workload("w", ("q",), 8, lengths).limits(answer_len) == limits
