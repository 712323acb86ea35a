"""Memory estimates, auto batch size, OOM backoff and peak measurement."""

import numpy as np
import pytest
import torch

from hired_batch.bench import ideal
from hired_batch.bench.model_sizes import PRESETS
from hired_batch.config import SelectionConfig
from hired_batch.engine import batching, dims

SIZES = [(672, 672), (480, 640), (1008, 336), (336, 672)]


def _items(d, selector, budget):
    return [ideal.item_tokens(d, hw, SelectionConfig(selector=selector, budget=budget), n_text=16) for hw in SIZES]


def test_parse_bytes_and_batch_size():
    assert batching.parse_bytes("8GB") == 8 * 10**9
    assert batching.parse_bytes("512MiB") == 512 * 2**20
    assert batching.parse_bytes("1.5g") == 1_500_000_000
    assert batching.parse_bytes(1000) == 1000
    for bad in ("eight", "8XB", "", "-1GB"):
        with pytest.raises(ValueError, match="memory size"):
            batching.parse_bytes(bad)
    assert batching.parse_batch_size("auto") == "auto" and batching.parse_batch_size("4") == 4
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        batching.parse_batch_size("0")


def _per_item(d, sel, budget, batch, chunk):
    """Bytes per item of a batch of `batch` copies of the heaviest workload item."""
    items = _items(d, sel, budget)
    heavy = max(items, key=lambda i: batching.batch_bytes(d, [i], 32, chunk))
    return batching.batch_bytes(d, [heavy] * batch, 32, chunk) / batch


BUDGETS = [("full", 1.0), ("hired", 0.4), ("hired", 0.2), ("hired", 0.1)]


@pytest.mark.parametrize("preset", ["scaled", "llava-next-7b"])
def test_memory_per_item_falls_with_the_budget(preset):
    d = PRESETS[preset].dims()
    for batch in (4, 16, 64):
        per_item = [_per_item(d, sel, b, batch, chunk=8) for sel, b in BUDGETS]
        assert per_item == sorted(per_item, reverse=True) and len(set(per_item)) == 4, (batch, per_item)


def test_chunked_vision_is_what_lets_memory_fall_below_20_percent():
    d = PRESETS["scaled"].dims()  # a small LM: the vision pass matters most (the 7B's KV cache dominates)
    # all crops through CLIP at once: the vision pass, the same for every budget, sets the peak
    whole = [_per_item(d, "hired", b, 16, chunk=None) for b in (0.2, 0.1)]
    assert whole[1] > 0.95 * whole[0]
    chunked = [_per_item(d, "hired", b, 16, chunk=8) for b in (0.2, 0.1)]
    assert chunked[1] < 0.6 * chunked[0] and chunked[0] <= whole[0]
    # one chunk's working set is paid once per batch, not per item
    assert batching.vision_work_bytes(d, 8) == 8 * batching.vision_work_bytes(d, 1)


@pytest.mark.parametrize("preset", ["scaled", "llava-next-7b"])
def test_auto_batch_is_3x_larger_for_hired_20_than_full_under_one_limit(preset):
    d = PRESETS[preset].dims()
    four_full = _per_item(d, "full", 1.0, 4, chunk=8) * 4
    limit = dims.weight_bytes(d) + four_full / 0.9 + 1  # room for exactly 4 full items
    full = batching.auto_batch_size(d, _items(d, "full", 1.0), 32, limit, vision_chunk=8)
    hired = batching.auto_batch_size(d, _items(d, "hired", 0.2), 32, limit, vision_chunk=8)
    hired10 = batching.auto_batch_size(d, _items(d, "hired", 0.1), 32, limit, vision_chunk=8)
    assert full == 4
    assert hired >= 3 * full
    assert hired10 > hired  # a smaller budget buys a larger batch


def test_auto_batch_is_the_largest_batch_under_the_limit():
    d = PRESETS["scaled"].dims()
    items = _items(d, "hired", 0.2)
    limit = 3 * 10**9
    n = batching.auto_batch_size(d, items, 32, limit, vision_chunk=8)
    worst = batching.worst_case(d, items, 32)
    free = (limit - dims.weight_bytes(d)) * 0.9
    assert batching.copies_bytes(d, worst, n, 8) <= free < batching.copies_bytes(d, worst, n + 1, 8)


def test_auto_batch_fits_any_mix_of_the_items():
    d = PRESETS["scaled"].dims()
    # many crops and a short prompt vs fewer crops and a long prompt: at one item the
    # first looks heavier (CLIP's working set), at large batches the second is
    many_crops = ideal.item_tokens(d, (672, 672), SelectionConfig(selector="hired", budget=0.1), n_text=16)
    long_prompt = ideal.item_tokens(d, (1008, 336), SelectionConfig(selector="hired", budget=0.1), n_text=300)
    limit = 4 * 10**9
    both = batching.auto_batch_size(d, [many_crops, long_prompt], 32, limit, vision_chunk=8)
    alone = [batching.auto_batch_size(d, [i], 32, limit, vision_chunk=8) for i in (many_crops, long_prompt)]
    assert both <= min(alone)
    free = (limit - dims.weight_bytes(d)) * 0.9
    rng = np.random.default_rng(0)
    for _ in range(20):
        mix = [[many_crops, long_prompt][k] for k in rng.integers(0, 2, both)]
        assert batching.batch_bytes(d, mix, 32, 8) <= free


def test_auto_batch_refuses_a_limit_below_weights_plus_one_item():
    d = PRESETS["scaled"].dims()
    with pytest.raises(ValueError, match="cannot hold the weights"):
        batching.auto_batch_size(d, _items(d, "full", 1.0), 8, dims.weight_bytes(d) + 1000)
    assert batching.memory_limit("2GB") == 2 * 10**9
    assert batching.memory_limit(None, "cpu") > 0  # available host memory


class FakeOOMModel:
    """Raises an out-of-memory error for batches above `max_ok` or holding `poison`."""

    def __init__(self, max_ok, poison=None, error=torch.OutOfMemoryError):
        self.max_ok, self.poison, self.error, self.calls = max_ok, poison, error, []

    def __call__(self, chunk):
        self.calls.append(list(chunk))
        if len(chunk) > self.max_ok or self.poison in chunk:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in chunk]


def _reraise(i, exc):
    raise exc


@pytest.fixture
def freed(monkeypatch):
    """Counts cache frees; the real one (gc.collect) takes seconds in a test session's large heap."""
    calls = []
    monkeypatch.setattr(batching, "free_cache", lambda: calls.append(1))
    return calls


def test_backoff_halves_until_the_batch_fits(freed):
    fake = FakeOOMModel(max_ok=3)
    done = []
    halvings = batching.halve_on_oom(lambda idx: done.append((idx, fake(idx))), list(range(10)), _reraise)
    assert halvings == 3  # 10 -> 5 + 5 -> (2 + 3) + (2 + 3)
    assert len(freed) == 3  # once per out-of-memory batch
    assert [c for c, _ in done] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert [x for _, r in done for x in r] == [x * 10 for x in range(10)]
    assert fake.calls[:2] == [list(range(10)), list(range(5))]


def test_backoff_hands_a_single_item_that_does_not_fit_to_the_caller(freed):
    fake = FakeOOMModel(max_ok=100, poison=5, error=RuntimeError)  # message says "out of memory"
    alone, done = [], []
    batching.halve_on_oom(lambda idx: done.extend(fake(idx)), list(range(8)), lambda i, e: alone.append((i, str(e))))
    assert len(freed) == 4  # [0..7], [4..7], [4, 5], [5]: every batch holding item 5
    assert alone == [(5, "CUDA out of memory. Tried to allocate 2.00 GiB")]
    assert sorted(done) == [x * 10 for x in range(8) if x != 5]
    with pytest.raises(RuntimeError, match="out of memory"):
        batching.halve_on_oom(fake, list(range(8)), _reraise)
    assert fake.calls[-1] == [5]


def test_backoff_passes_other_errors_through():
    def broken(chunk):
        raise ValueError("not an allocation failure")

    with pytest.raises(ValueError, match="not an allocation"):
        batching.halve_on_oom(broken, [1, 2], _reraise)
    assert batching.is_oom(torch.OutOfMemoryError("x")) and batching.is_oom(MemoryError())
    assert batching.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not batching.is_oom(RuntimeError("shape mismatch"))


def test_backoff_with_on_error_runs_a_failing_batch_item_by_item():
    def poisoned(chunk):
        if 3 in chunk:
            raise KeyError("row 3 is bad")
        done.extend(chunk)

    done, failed = [], []
    batching.halve_on_oom(poisoned, [1, 2, 3, 4], _reraise, lambda i, e: failed.append((i, type(e))))
    assert failed == [(3, KeyError)] and sorted(done) == [1, 2, 4]
    # an OOM first halves; the half holding the bad row then runs item by item
    fake, failed, done = FakeOOMModel(max_ok=2), [], []
    batching.halve_on_oom(lambda c: poisoned(fake(c) and c), [1, 2, 3, 4], _reraise, lambda i, e: failed.append(i))
    assert failed == [3] and sorted(done) == [1, 2, 4] and fake.calls[:3] == [[1, 2, 3, 4], [1, 2], [3, 4]]


def test_group_by_count_sorts_heaviest_first():
    assert batching.group_by_count([5, 9, 1, 9, 3], 2) == [[1, 3], [0, 4], [2]]


def test_peak_memory_sees_a_transient_allocation():
    with batching.PeakMemory("cpu") as pm:
        a = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
        del a
    assert pm.delta >= 150 * 2**20
    with batching.PeakMemory("cpu") as quiet:
        sum(range(1000))
    assert quiet.delta < 50 * 2**20
