"""Micro-batching: size / deadline / adaptive.

A batch closes at ``max_batch_size`` events or ``max_batch_delay`` seconds
after its first event, whichever comes first; with ``adaptive`` a partial batch
goes at once when the inference pool is idle, so low load gets small batches
(low latency) and high load gets large ones (throughput). Pure logic: the
orchestrator passes the clock in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Accumulates items and says when a batch is due."""

    def __init__(self, max_size: int, max_delay_s: float, adaptive: bool = True):
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self.adaptive = adaptive
        self._items: list[T] = []
        self._first_at: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def room(self) -> int:
        return self.max_size - len(self._items)

    def add(self, items: Iterable[T], now: float) -> list[list[T]]:
        """Add items; return the full batches they closed (possibly none)."""
        items = items if isinstance(items, list) else list(items)
        closed: list[list[T]] = []
        while items:
            if not self._items:
                self._first_at = now
            room = self.max_size - len(self._items)
            if room >= len(items):
                self._items.extend(items)
                items = []
            else:  # slices, not a loop per item: this runs for every consumed event
                self._items.extend(items[:room])
                items = items[room:]
            if len(self._items) >= self.max_size:
                closed.append(self.take())
        return closed

    def due(self, now: float, pool_idle: bool) -> bool:
        """Whether the partial batch should go now."""
        if not self._items:
            return False
        if self.adaptive and pool_idle:
            return True
        return now >= self._first_at + self.max_delay_s  # type: ignore[operator]

    def time_left(self, now: float) -> float | None:
        """Seconds until the open batch's deadline, or None when empty."""
        if not self._items:
            return None
        return max(0.0, self._first_at + self.max_delay_s - now)  # type: ignore[operator]

    def take(self) -> list[T]:
        items, self._items, self._first_at = self._items, [], None
        return items

    def drop(self, predicate: Callable[[T], bool]) -> int:
        """Remove the items for which predicate is true (revoked partitions); return how many."""
        kept = [i for i in self._items if not predicate(i)]
        dropped = len(self._items) - len(kept)
        self._items = kept
        if not kept:
            self._first_at = None
        return dropped
