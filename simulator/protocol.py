"""The replay protocol: the order events arrive in, drift scenarios, the base block and the blocks.

Ids: users and items are renumbered in order of first appearance in the replay. The base block's
nodes are therefore 0..n-1, exactly the base model's indices (which the streaming learner, started
from the base checkpoint, names "0".."n-1"), every later node takes the next index, and any prefix
of the replay has contiguous ids, so a prefix is directly an `InteractionData` to (re)train on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from gnaq_stream.data.datasets import InteractionData, Split
from gnaq_stream.errors import ConfigError

SCENARIOS = ("none", "popularity-shift", "new-items")
SCENARIO_DOCS = {
    "none": "the dataset's own order, unchanged",
    "popularity-shift": "the future (everything after the base block) is re-ordered by the mean of each "
                        "event's position in the future and its item's base-block popularity quantile, reversed: "
                        "interactions drift from the base block's popular items to its unpopular and unseen ones",
    "new-items": "a seeded 10% of the items (holding at most half of the future's events) are held out of the "
                 "base block; each enters at a random point of the future, all its interactions in one burst",
}
NEW_ITEMS_SHARE = 0.1
POPULARITY_SHIFT_WEIGHT = 0.5  # weight of the popularity quantile against the position in the sort key


@dataclass(frozen=True)
class Replay:
    """Events in replay order with replay ids; `bounds` = [0, end of base, end of block 1, ..., n]."""

    dataset: str
    order: str
    scenario: str
    users: np.ndarray
    items: np.ndarray
    ts: np.ndarray  # unix seconds where the dataset has timestamps, else the event's replay position
    bounds: tuple[int, ...]

    @property
    def n_events(self) -> int:
        return len(self.users)

    @property
    def n_blocks(self) -> int:
        return len(self.bounds) - 2

    def block(self, k: int) -> tuple[int, int]:
        """Start and end of block k (0-based; the base block is not a block)."""
        return self.bounds[k + 1], self.bounds[k + 2]

    def prefix(self, end: int) -> InteractionData:
        """The first `end` events as training data; its nodes are exactly the ones seen so far."""
        users, items = self.users[:end], self.items[:end]
        empty = np.zeros(0, dtype=np.int64)  # the trainer's final test evaluation is not ours: skip it
        return InteractionData(f"{self.dataset}[:{end}]", int(users.max()) + 1, int(items.max()) + 1,
                               Split(users, items, self.ts[:end]), Split(empty, empty))


def interleave_users(users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Order of a random merge of the users' event sequences: each user's events keep their order."""
    slots = users[rng.permutation(len(users))]  # which user speaks at each position
    order = np.empty(len(users), dtype=np.int64)
    order[np.argsort(slots, kind="stable")] = np.argsort(users, kind="stable")
    return order


def event_order(data: InteractionData, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """Users, items, timestamps (or None) in replay order, and a plain description of that order."""
    splits = [("train", data.train)] + ([("valid", data.valid)] if data.valid is not None else []) + \
             [("test", data.test)]
    users = np.concatenate([s.users for _, s in splits]).astype(np.int64)
    items = np.concatenate([s.items for _, s in splits]).astype(np.int64)
    if all(s.ts is not None for _, s in splits):
        ts = np.concatenate([s.ts for _, s in splits]).astype(np.int64)
        order = np.argsort(ts, kind="stable")
        return users[order], items[order], ts[order], "true time order (timestamps; ties in file order)"
    rng = np.random.default_rng(seed)
    parts, start = [], 0
    for _, split in splits:
        parts.append(start + interleave_users(np.asarray(split.users), rng))
        start += len(split)
    order = np.concatenate(parts)
    names = ", then ".join(name for name, _ in splits)
    text = (f"no timestamps: the {names} split(s) in that order (train = history, the rest = the future); "
            f"within a split users' events are interleaved at random (seed {seed}), each user's own events "
            f"in file order")
    return users[order], items[order], None, text


def cut_points(n: int, base_fraction: float, block_fraction: float) -> tuple[int, ...]:
    """[0, end of base, end of each block...]; the last block takes what is left (it may be shorter)."""
    if not 0.0 < base_fraction < 1.0:
        raise ConfigError(f"--base-fraction must be in (0, 1), got {base_fraction}")
    if not 0.0 < block_fraction <= 1.0 - base_fraction + 1e-9:
        raise ConfigError(f"--block-fraction must be in (0, 1 - base fraction], got {block_fraction}")
    n_blocks = max(1, math.ceil((1.0 - base_fraction) / block_fraction - 1e-9))
    ends = [round(n * (base_fraction + k * block_fraction)) for k in range(n_blocks)] + [n]
    bounds = (0, *ends)
    if any(b >= e for b, e in zip(bounds, bounds[1:])):
        raise ConfigError(f"{n} events are too few for a base of {base_fraction} and blocks of {block_fraction}")
    return bounds


def _popularity_shift(items: np.ndarray, n_base: int) -> np.ndarray:
    popularity = np.bincount(items[:n_base], minlength=int(items.max()) + 1)
    quantile = (rankdata(popularity) - 1) / max(len(popularity) - 1, 1)  # 0 = least popular in the base
    m = len(items) - n_base
    position = np.arange(m) / max(m - 1, 1)
    key = (1 - POPULARITY_SHIFT_WEIGHT) * position + POPULARITY_SHIFT_WEIGHT * (1 - quantile[items[n_base:]])
    return np.r_[np.arange(n_base), n_base + np.argsort(key, kind="stable")]


def _new_items(items: np.ndarray, n_base: int, rng: np.random.Generator) -> np.ndarray:
    ids, counts = np.unique(items, return_counts=True)
    budget, target = (len(items) - n_base) // 2, max(1, round(NEW_ITEMS_SHARE * len(ids)))
    chosen, moved = [], 0
    for k in rng.permutation(len(ids)).tolist():
        if len(chosen) == target:
            break
        if moved + counts[k] <= budget:  # the rest must still fill the base block
            chosen.append(ids[k])
            moved += counts[k]
    chosen = np.asarray(chosen, dtype=np.int64)
    held = np.isin(items, chosen)
    rest, burst = np.flatnonzero(~held), np.flatnonzero(held)
    future = rest[n_base:]
    entry = rng.integers(0, len(future) + 1, size=len(chosen))  # future position each held item enters at
    sorter = np.argsort(chosen)
    rank = sorter[np.searchsorted(chosen, items[burst], sorter=sorter)]  # index into `chosen` of each burst event
    merged = np.r_[future, burst]
    at = np.r_[np.arange(len(future)), entry[rank]]
    is_rest = np.r_[np.ones(len(future)), np.zeros(len(burst))]  # a burst goes before the event at its point
    group = np.r_[np.zeros(len(future)), rank]
    return np.r_[rest[:n_base], merged[np.lexsort((merged, group, is_rest, at))]]


def apply_scenario(users: np.ndarray, items: np.ndarray, scenario: str, n_base: int, seed: int) -> np.ndarray:
    """A permutation of the events (every event kept) that adds the scenario's drift."""
    if scenario == "none":
        return np.arange(len(users))
    if scenario == "popularity-shift":
        return _popularity_shift(items, n_base)
    if scenario == "new-items":
        return _new_items(items, n_base, np.random.default_rng(seed))
    raise ConfigError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")


def first_appearance_ids(ids: np.ndarray) -> np.ndarray:
    """Renumber ids 0, 1, ... in order of first appearance."""
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]


def build_replay(data: InteractionData, scenario: str, base_fraction: float, block_fraction: float,
                 seed: int) -> Replay:
    users, items, ts, order = event_order(data, seed)
    bounds = cut_points(len(users), base_fraction, block_fraction)
    perm = apply_scenario(users, items, scenario, bounds[1], seed)
    users, items = users[perm], items[perm]
    ts = ts[perm] if ts is not None else np.arange(len(users), dtype=np.int64)
    return Replay(data.name, order, scenario, first_appearance_ids(users), first_appearance_ids(items), ts, bounds)
