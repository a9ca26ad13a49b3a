"""The replay protocol: deterministic orders, blocks that add up, scenarios that keep every event."""

import numpy as np
import pytest

from gnaq_stream.data.datasets import InteractionData, Split, load_dataset
from gnaq_stream.errors import ConfigError
from simulator.protocol import (NEW_ITEMS_SHARE, SCENARIOS, apply_scenario, build_replay, cut_points, event_order,
                                first_appearance_ids, interleave_users)


@pytest.fixture(scope="module")
def ml100k(data_dir):
    return load_dataset("ml-100k", data_dir)


def untimed(seed: int = 0) -> InteractionData:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(50), 8)
    items = rng.integers(0, 40, size=len(users))
    test_users = np.repeat(np.arange(50), 2)
    return InteractionData("toy", 50, 40, Split(users, items), Split(test_users, rng.integers(0, 40, 100)))


def test_time_order_is_sorted_and_deterministic(ml100k):
    users, items, ts, text = event_order(ml100k, seed=1)
    again = event_order(ml100k, seed=2)  # the seed only matters without timestamps
    assert "time order" in text
    assert np.all(np.diff(ts) >= 0)
    assert len(users) == len(ml100k.train) + len(ml100k.test) == 100_000
    for a, b in zip((users, items, ts), again[:3]):
        np.testing.assert_array_equal(a, b)


def test_interleaved_order_is_deterministic_and_keeps_each_users_order():
    data = untimed()
    first, second, other = event_order(data, 7), event_order(data, 7), event_order(data, 8)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] is None and "no timestamps" in first[3]
    assert not np.array_equal(first[0], other[0])
    n_train = len(data.train)
    # the train split (history) comes first, then the test split (future)
    assert sorted(zip(first[0][:n_train], first[1][:n_train])) == sorted(zip(data.train.users, data.train.items))
    order = interleave_users(data.train.users, np.random.default_rng(3))
    assert sorted(order) == list(range(n_train))
    for u in range(50):
        positions = order[data.train.users[order] == u]
        assert np.all(np.diff(positions) > 0), "a user's own events must keep their file order"


@pytest.mark.parametrize("n,base,block,sizes", [
    (100_000, 0.6, 0.1, [60_000, 10_000, 10_000, 10_000, 10_000]),
    (100_000, 0.6, 0.2, [60_000, 20_000, 20_000]),
    (1001, 0.6, 0.15, [601, 150, 150, 100]),  # the last block takes what is left
])
def test_blocks_add_up(n, base, block, sizes):
    bounds = cut_points(n, base, block)
    assert bounds[0] == 0 and bounds[-1] == n
    assert list(np.diff(bounds)) == sizes


@pytest.mark.parametrize("base,block", [(0.0, 0.1), (1.0, 0.1), (0.6, 0.0), (0.6, 0.5)])
def test_bad_fractions_are_clear_errors(base, block):
    with pytest.raises(ConfigError, match="fraction"):
        cut_points(1000, base, block)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenarios_keep_every_event(ml100k, scenario):
    users, items, _, _ = event_order(ml100k, 0)
    n_base = cut_points(len(users), 0.6, 0.1)[1]
    perm = apply_scenario(users, items, scenario, n_base, seed=5)
    np.testing.assert_array_equal(np.sort(perm), np.arange(len(users)))
    np.testing.assert_array_equal(perm, apply_scenario(users, items, scenario, n_base, seed=5))


def test_popularity_shift_moves_interactions_from_popular_to_unpopular_items(ml100k):
    users, items, _, _ = event_order(ml100k, 0)
    bounds = cut_points(len(users), 0.6, 0.1)
    perm = apply_scenario(users, items, "popularity-shift", bounds[1], seed=0)
    np.testing.assert_array_equal(perm[:bounds[1]], np.arange(bounds[1]))  # the base block is untouched
    popularity = np.bincount(items[:bounds[1]], minlength=items.max() + 1)
    shifted = items[perm]
    first, last = shifted[bounds[1]:bounds[2]], shifted[bounds[-2]:]
    assert popularity[first].mean() > 2 * popularity[last].mean()


def test_new_items_arrive_late_in_bursts(ml100k):
    users, items, _, _ = event_order(ml100k, 0)
    n_base = cut_points(len(users), 0.6, 0.1)[1]

    def bursts(order: np.ndarray) -> int:
        """Items absent from the base block whose several interactions all arrive back to back."""
        shifted = items[order]
        late = np.setdiff1d(shifted[n_base:], shifted[:n_base])
        runs = [np.flatnonzero(shifted == item) for item in late]
        return sum(len(w) > 1 and w[-1] - w[0] + 1 == len(w) for w in runs)

    assert bursts(apply_scenario(users, items, "none", n_base, seed=0)) == 0
    held = bursts(apply_scenario(users, items, "new-items", n_base, seed=0))
    assert held >= 0.5 * NEW_ITEMS_SHARE * len(np.unique(items))  # most held items have more than one event


def test_ids_follow_first_appearance_so_the_base_nodes_come_first(ml100k):
    replay = build_replay(ml100k, "new-items", 0.6, 0.1, seed=3)
    assert replay.n_events == 100_000 and replay.bounds[-1] == 100_000
    for ids in (replay.users, replay.items):
        _, first = np.unique(ids, return_index=True)
        assert np.all(np.diff(first) > 0)  # id k appears before id k + 1
        n_base_nodes = len(np.unique(ids[:replay.bounds[1]]))
        assert ids[:replay.bounds[1]].max() == n_base_nodes - 1
    data = replay.prefix(replay.bounds[2])
    assert (data.n_users, data.n_items) == (replay.users[:replay.bounds[2]].max() + 1,
                                            replay.items[:replay.bounds[2]].max() + 1)
    np.testing.assert_array_equal(first_appearance_ids(np.array([7, 3, 7, 9, 3])), [0, 1, 0, 2, 1])
