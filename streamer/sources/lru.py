"""The two small containers the caches are built from: a weighted LRU and a freshness guard."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lru(Generic[K, V]):
    """Least-recently-used map whose total `weight` never exceeds `capacity`.

    The weight of an item is 1 unless `weight` says otherwise (a room weighs its
    member count), so the bound is on what memory holds, not on the number of keys.
    An item heavier than the whole capacity is not kept at all. `on_evict` lets a
    cache drop its secondary indexes together with the item.
    """

    def __init__(
        self,
        capacity: int,
        weight: Callable[[V], int] = lambda _: 1,
        on_evict: Callable[[K, V], None] = lambda _k, _v: None,
    ) -> None:
        self.capacity = capacity
        self._weight = weight
        self._on_evict = on_evict
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.total = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def peek(self, key: K) -> V | None:
        """Like `get`, without counting as a use (for the change streams' updates)."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def put(self, key: K, value: V) -> bool:
        """Store (or re-weigh after a change) one item; False when it is too heavy to keep."""
        known = self.pop(key, evicted=False) is not None
        weight = self._weight(value)
        if weight > self.capacity:
            if known:
                self._on_evict(key, value)
            return False
        self._items[key] = (value, weight)
        self.total += weight
        while self.total > self.capacity:
            old_key, (old_value, old_weight) = self._items.popitem(last=False)
            self.total -= old_weight
            self._on_evict(old_key, old_value)
        return True

    def pop(self, key: K, evicted: bool = True) -> V | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.total -= item[1]
        if evicted:
            self._on_evict(key, item[0])
        return item[0]

    def keys(self) -> list[K]:
        return list(self._items)


class Expiring(Generic[K, V]):
    """An LRU whose items also expire `ttl` seconds after they were stored.

    For collections no change stream follows (rooms, permissions): a short TTL
    bounds how stale an answer can be.
    """

    def __init__(self, capacity: int, ttl: float) -> None:
        self._ttl = ttl
        self._items: Lru[K, tuple[float, V]] = Lru(capacity)

    def get(self, key: K) -> tuple[V] | None:
        """The stored value in a 1-tuple (a stored None is an answer too), or None on a miss."""
        item = self._items.get(key)
        if item is None or item[0] < time.monotonic():
            return None
        return (item[1],)

    def put(self, key: K, value: V) -> None:
        self._items.put(key, (time.monotonic() + self._ttl, value))


class Freshness:
    """Tells whether a key changed while a query for it was in flight.

    A cache miss queries MongoDB; if a change stream updates the same key before
    the answer arrives, storing the (older) answer would undo the update. Queries
    call `begin` and `end`; the streams call `changed` (or `all_changed` when they
    cannot tell which key a change belongs to); `end` returns the keys whose
    answers are still fresh enough to store.
    """

    def __init__(self) -> None:
        self._sequence = 0
        self._in_flight: Counter[Hashable] = Counter()
        self._changed_at: dict[Hashable, int] = {}

    def begin(self, keys: Iterable[Hashable]) -> int:
        for key in keys:
            self._in_flight[key] += 1
        return self._sequence

    def changed(self, key: Hashable) -> None:
        self._sequence += 1
        if key in self._in_flight:
            self._changed_at[key] = self._sequence

    def all_changed(self) -> None:
        self._sequence += 1
        for key in self._in_flight:
            self._changed_at[key] = self._sequence

    def end(self, keys: Iterable[Hashable], ticket: int) -> set[Hashable]:
        fresh = set()
        for key in keys:
            if self._changed_at.get(key, 0) <= ticket:
                fresh.add(key)
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]
                self._changed_at.pop(key, None)
        return fresh
