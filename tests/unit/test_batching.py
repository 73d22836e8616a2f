"""Micro-batcher: size, deadline and adaptive closing; dropping revoked partitions."""

from hypothesis import given
from hypothesis import strategies as st

from workers.batching import MicroBatcher


def test_closes_at_size():
    b = MicroBatcher(3, 1.0, adaptive=False)
    closed = b.add(range(7), now=0.0)
    assert closed == [[0, 1, 2], [3, 4, 5]]
    assert len(b) == 1


def test_closes_at_deadline_not_before():
    b = MicroBatcher(100, 0.02, adaptive=False)
    b.add([1], now=10.0)
    assert not b.due(10.019, pool_idle=True)
    assert b.time_left(10.01) > 0
    assert b.due(10.02, pool_idle=False)


def test_adaptive_sends_partial_batch_when_pool_idle():
    b = MicroBatcher(100, 1.0, adaptive=True)
    b.add([1, 2], now=0.0)
    assert b.due(0.0, pool_idle=True)
    assert not b.due(0.0, pool_idle=False)


def test_drop_removes_only_matching_items():
    b = MicroBatcher(100, 1.0)
    b.add([("a", 0), ("a", 1), ("b", 0)], now=0.0)
    assert b.drop(lambda item: item[0] == "a") == 2
    assert b.take() == [("b", 0)]
    assert b.time_left(0.0) is None


@given(st.lists(st.integers(), max_size=200), st.integers(min_value=1, max_value=17))
def test_every_item_leaves_exactly_once_in_order(items, size):
    b = MicroBatcher(size, 1.0)
    out = [i for batch in b.add(items, now=0.0) for i in batch] + b.take()
    assert out == items
