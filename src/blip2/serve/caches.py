"""The engine's two caches, each bounded in bytes and evicting the least recently used entry first.

``ImageCache``: image hash -> tensor (the visual prompt [V, H_llm]; the ITC embeddings [Q, E]), so a later request
with the same image skips the encoder and the Q-Former. ``PrefixCache``: a finished conversation's LLM key/value
cache, found again by the longest common prefix of token keys (``Prompt.key``), so the next turn of a conversation,
or another conversation that starts alike (same system prompt, same image), runs only the positions after it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from torch import Tensor

Layers = list[tuple[Tensor, Tensor]]  # per LLM layer: keys, values [1, heads, L, head_dim]


class ByteLRU:
    """A mapping bounded in bytes: putting an entry evicts the least recently used ones until it fits.
    An entry larger than the whole budget is not kept."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable, count: bool = True) -> object | None:
        found = self._entries.get(key)
        if count:
            self.hits += found is not None
            self.misses += found is None
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def put(self, key: Hashable, value: object, size: int) -> None:
        self.pop(key)
        if size > self.budget:
            return
        while self.used + size > self.budget:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.used -= evicted
        self._entries[key] = (value, size)
        self.used += size

    def pop(self, key: Hashable) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self.used -= found[1]

    def keys(self) -> list[Hashable]:
        return list(self._entries)


class ImageCache(ByteLRU):
    """(kind, image hash) -> tensor."""

    def put_tensor(self, key: Hashable, value: Tensor) -> None:
        self.put(key, value, value.numel() * value.element_size())


@dataclass
class PrefixEntry:
    key: list  # what the cached positions hold (Prompt.key, then the generated tokens that were fed)
    layers: Layers


class PrefixCache:
    """Key/value caches of finished conversations, looked up by the longest common prefix of their keys."""

    def __init__(self, budget: int):
        self.lru = ByteLRU(budget)
        self.lookups = 0
        self.hits = 0
        self.reused_positions = 0
        self.looked_up_positions = 0
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.lru)

    @property
    def used(self) -> int:
        return self.lru.used

    def lookup(self, key: list, limit: int) -> tuple[int, Layers | None]:
        """(positions reusable, at most ``limit``; the layers holding them, or None): the entry sharing the longest
        prefix with ``key``."""
        best, best_id = 0, None
        for entry_id in self.lru.keys():
            entry: PrefixEntry = self.lru.get(entry_id, count=False)
            length = common_prefix(entry.key, key)
            if length > best:
                best, best_id = length, entry_id
        best = min(best, limit)
        self.lookups += 1
        self.looked_up_positions += len(key)
        if best_id is None or best == 0:
            return 0, None
        self.hits += 1
        self.reused_positions += best
        return best, self.lru.get(best_id, count=False).layers

    def put(self, key: list, layers: Layers) -> None:
        """Keep ``layers`` (holding ``len(key)`` positions); entries that are a prefix of ``key`` are dropped: this
        one holds all they hold."""
        if self.lru.budget <= 0:
            return
        for entry_id in self.lru.keys():
            old: PrefixEntry = self.lru.get(entry_id, count=False)
            if len(old.key) <= len(key) and common_prefix(old.key, key) == len(old.key):
                self.lru.pop(entry_id)
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        self._next_id += 1
        self.lru.put(self._next_id, PrefixEntry(list(key), layers), size)


def common_prefix(a: list, b: list) -> int:
    """The length of the longest common prefix (binary search over slice comparisons, which run in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low
