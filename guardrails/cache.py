"""Bounded caches for the detectors, keyed by a hash of the text so that they hold no text.

A guardrail sees prompts, answers and passages (personal data, often) for weeks on end. What it
caches of them must neither keep the text (a key is the text's SHA-256, or for a single word its
per-process hash, and a value is something derived: stems, numbers, a vector, a stemming recipe)
nor grow without bound (beyond its size, the least recently used entry goes). The caches:

- `guardrails.detectors.grounding`: what a passage offers as support (stems, numbers with units,
  stems per sentence), per SHA-256 of the passage; `GROUNDING_CACHE_SIZE` = 2,048 passages.
- `guardrails.text.stem`: how a word is stemmed (how many of its characters the stem keeps and the
  letter it adds, if any), per hash of the word; `STEM_CACHE_SIZE` = 65,536 words.
- `guardrails.detectors.embedding`: a context sentence's vector, per SHA-256 of the sentence;
  `cache_size` = 20,000 sentences by default.

Nothing else in `guardrails` caches: NLI, judge, consistency, uncertainty and calibration compute
per call, and a retrieval `KnowledgeBase` is the route's own passages (the gateway keeps one per
configured route, keyed by the route's name). `Guard.clear_caches()` empties the detectors' caches.
Imports the standard library only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most `size` entries, the least recently used out first.

    Safe to share between threads without a lock (a lock would double the cost of a hit, which
    `stem` pays per word): each step is one `OrderedDict` operation, atomic on its own, and an entry
    evicted by another thread between two steps reads as a miss."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"an LRU cache needs a size of at least 1, not {size}")
        self.size = size
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The value for `key` (now the most recently used), or None."""
        try:
            self._data.move_to_end(key)
            return self._data[key]
        except KeyError:
            return None

    def put(self, key: K, value: V) -> None:
        data = self._data
        data[key] = value
        try:
            data.move_to_end(key)
            while len(data) > self.size:
                data.popitem(last=False)
        except KeyError:  # emptied meanwhile by another thread
            pass

    def get_or_add(self, key: K, compute: Callable[[], V]) -> V:
        """The value for `key`, computed and stored when missing."""
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def clear(self) -> None:
        self._data.clear()

    def keys(self) -> list[K]:
        """The keys, least recently used first."""
        return list(self._data)

    def items(self) -> list[tuple[K, V]]:
        return list(self._data.items())

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        """Whether `key` is cached (without making it the most recently used)."""
        return key in self._data

    def __iter__(self) -> Iterator[K]:
        """The keys, least recently used first (a snapshot)."""
        return iter(self.keys())
