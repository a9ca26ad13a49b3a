from collections import Counter

import numpy as np
import pytest

from gnaq_stream.data.datasets import REGISTRY, carve_validation, load_dataset, temporal_split
from gnaq_stream.errors import DatasetError


@pytest.mark.parametrize("name", sorted(REGISTRY) + ["yelp"])
def test_every_registered_dataset_loads(name, data_dir):
    d = load_dataset(name, data_dir)
    assert d.n_users > 0 and d.n_items > 0 and len(d.train) > 0 and len(d.test) > 0
    for split in (d.train, d.test):
        assert split.users.max() < d.n_users and split.items.max() < d.n_items
    assert (d.train.ts is not None) == REGISTRY[d.name].timestamps


def test_known_sizes(data_dir):
    g = load_dataset("gowalla", data_dir)
    assert (g.n_users, g.n_items, len(g.train), len(g.test)) == (29858, 40981, 810128, 217242)
    m = load_dataset("ml-100k", data_dir)
    assert (m.n_users, m.n_items, len(m.train) + len(m.test)) == (943, 1682, 100_000)


def test_ml100k_test_events_come_after_train_events_per_user(data_dir):
    d = load_dataset("ml-100k", data_dir)
    last_train = np.full(d.n_users, -1)
    np.maximum.at(last_train, d.train.users, d.train.ts)
    first_test = np.full(d.n_users, np.iinfo(np.int64).max)
    np.minimum.at(first_test, d.test.users, d.test.ts)
    assert (last_train[d.test.users] <= first_test[d.test.users]).all()


def test_temporal_split_by_hand():
    users = np.array([0, 0, 0, 0, 0, 1])
    items = np.array([10, 11, 12, 13, 14, 15])
    ts = np.array([5, 1, 4, 2, 3, 9])
    train, test = temporal_split(users, items, ts, 0.4)
    assert sorted(test.items.tolist()) == [10, 12]
    assert sorted(train.items.tolist()) == [11, 13, 14, 15]


def _pairs(split) -> Counter:
    """Interactions as a multiset of (user, item, time): repeated visits stay distinct."""
    ts = split.ts.tolist() if split.ts is not None else [None] * len(split)
    return Counter(zip(split.users.tolist(), split.items.tolist(), ts))


@pytest.mark.parametrize("name", ["gowalla", "gowalla-ts"])
def test_carved_validation_is_a_share_of_each_users_training_and_apart_from_test(name, data_dir):
    d = load_dataset(name, data_dir)
    carved = carve_validation(d, 0.1, seed=3)
    train, valid = _pairs(carved.train), _pairs(carved.valid)
    assert train + valid == _pairs(d.train)  # a partition: nothing lost, nothing in both
    assert carved.test is d.test
    per_user = np.bincount(d.train.users, minlength=d.n_users)
    carved_per_user = np.bincount(carved.valid.users, minlength=d.n_users)
    assert (carved_per_user == np.minimum(np.round(per_user * 0.1), np.maximum(per_user - 1, 0))).all()
    again = carve_validation(d, 0.1, seed=3)
    assert np.array_equal(again.valid.users, carved.valid.users) and np.array_equal(again.valid.items,
                                                                                     carved.valid.items)
    if d.train.ts is not None:  # the latest of each user's training interactions
        last_train = np.full(d.n_users, -1)
        np.maximum.at(last_train, carved.train.users, carved.train.ts)
        assert (carved.valid.ts >= last_train[carved.valid.users]).all()
    else:
        other = carve_validation(d, 0.1, seed=4)
        assert _pairs(other.valid) != valid


def test_carving_leaves_a_validation_split_and_share_zero_alone(data_dir):
    ml = load_dataset("ml-1m", data_dir)
    assert carve_validation(ml, 0.1) is ml
    g = load_dataset("gowalla", data_dir)
    assert carve_validation(g, 0.0) is g


def test_unknown_dataset(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'nope'"):
        load_dataset("nope", tmp_path)


def test_missing_files_are_named(tmp_path):
    (tmp_path / "gowalla").mkdir()
    (tmp_path / "gowalla" / "train.txt").write_text("0 1 2\n")
    with pytest.raises(DatasetError, match=r"lacks test\.txt.*expected files: train\.txt, test\.txt"):
        load_dataset("gowalla", tmp_path)


def test_malformed_file(tmp_path):
    folder = tmp_path / "gowalla"
    folder.mkdir()
    (folder / "train.txt").write_text("0 1 2\n1 x 3\n")
    (folder / "test.txt").write_text("0 3\n")
    with pytest.raises(DatasetError, match=r"train\.txt: line 2"):
        load_dataset("gowalla", tmp_path)
