"""Dataset registry and loaders for the real datasets in the data directory.

Every dataset becomes an `InteractionData`: internal user ids 0..n_users-1, item ids
0..n_items-1, a train split (with timestamps where the dataset has them), an optional
validation split and a test split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from gnaq_stream.errors import DatasetError

DATA_DIR_ENV = "GNAQ_DATA_DIR"


@dataclass(frozen=True)
class Split:
    """Interactions as parallel arrays; `ts` is unix seconds or None when the dataset has none."""

    users: np.ndarray
    items: np.ndarray
    ts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.users)


@dataclass(frozen=True)
class InteractionData:
    name: str
    n_users: int
    n_items: int
    train: Split
    test: Split
    valid: Split | None = None


@dataclass(frozen=True)
class DatasetSpec:
    folder: str
    files: tuple[str, ...]
    loader: Callable[[Path], InteractionData]
    timestamps: bool
    source: str


def default_data_dir() -> Path:
    """`$GNAQ_DATA_DIR`, else `../shared/data` relative to the working directory."""
    return Path(os.environ.get(DATA_DIR_ENV, "../shared/data"))


def _read_adjacency_lists(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse `user item item ...` lines into parallel (user, item) arrays."""
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                row = np.array(parts, dtype=np.int64)
            except ValueError:
                raise DatasetError(f"{path}: line {line_no} is not whitespace-separated integer ids") from None
            if len(row) > 1:
                users.append(np.full(len(row) - 1, row[0], dtype=np.int64))
                items.append(row[1:])
    if not users:
        raise DatasetError(f"{path}: no interactions found")
    return np.concatenate(users), np.concatenate(items)


def _read_aligned_times(path: Path, n_expected: int) -> np.ndarray:
    """Timestamp lists (`user ts ts ...`) aligned position by position with an adjacency file."""
    _, ts = _read_adjacency_lists(path)
    if len(ts) != n_expected:
        raise DatasetError(f"{path}: {len(ts)} timestamps for {n_expected} interactions")
    return ts


def _check_ids(name: str, path: Path, users: np.ndarray, items: np.ndarray) -> None:
    if users.min() < 0 or items.min() < 0:
        raise DatasetError(f"{name} ({path}): negative ids")


def _load_lightgcn_style(path: Path, with_valid: bool = False, with_times: bool = False) -> InteractionData:
    name = path.name
    tr_u, tr_i = _read_adjacency_lists(path / "train.txt")
    te_u, te_i = _read_adjacency_lists(path / "test.txt")
    splits = [(tr_u, tr_i), (te_u, te_i)]
    valid = None
    if with_valid:
        va_u, va_i = _read_adjacency_lists(path / "valid.txt")
        splits.append((va_u, va_i))
        valid = Split(va_u, va_i)
    for u, i in splits:
        _check_ids(name, path, u, i)
    n_users = int(max(u.max() for u, _ in splits)) + 1
    n_items = int(max(i.max() for _, i in splits)) + 1
    tr_ts = te_ts = None
    if with_times:
        tr_ts = _read_aligned_times(path / "time_train.txt", len(tr_u))
        te_ts = _read_aligned_times(path / "time_test.txt", len(te_u))
    return InteractionData(name, n_users, n_items, Split(tr_u, tr_i, tr_ts), Split(te_u, te_i, te_ts), valid)


def temporal_split(users: np.ndarray, items: np.ndarray, ts: np.ndarray, test_fraction: float) -> tuple[Split, Split]:
    """Per user, the latest `test_fraction` of interactions (by time, ties by position) go to test."""
    order = np.lexsort((np.arange(len(users)), ts, users))
    u, i, t = users[order], items[order], ts[order]
    is_test = _last_of_each_user(u, lambda counts: np.floor(counts * test_fraction).astype(np.int64))
    return Split(u[~is_test], i[~is_test], t[~is_test]), Split(u[is_test], i[is_test], t[is_test])


def _last_of_each_user(sorted_users: np.ndarray, how_many: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Mask of the last `how_many(counts)` positions of each user's run in `sorted_users`."""
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_users)) + 1]
    counts = np.diff(np.r_[starts, len(sorted_users)])
    rank_in_user = np.arange(len(sorted_users)) - np.repeat(starts, counts)
    return rank_in_user >= np.repeat(counts - how_many(counts), counts)


def carve_validation(data: InteractionData, share: float, seed: int = 0) -> InteractionData:
    """`data` with a validation split carved from its train split, for datasets that ship none.

    Per user, `share` of the training interactions (rounded, at most all but one) move to the
    validation split: the latest ones where the train split has timestamps (as `temporal_split`),
    otherwise a random choice seeded by `seed` (fixed by default, so that runs of different training
    seeds, and a model continued from another, share one carve). Test is untouched. Data with a
    validation split, `share` 0, or users too small to give any are returned as they are.
    """
    if data.valid is not None or share <= 0:
        return data
    tr = data.train
    tiebreak = tr.ts if tr.ts is not None else np.random.default_rng(seed).random(len(tr))
    order = np.lexsort((np.arange(len(tr)), tiebreak, tr.users))
    is_valid = np.zeros(len(tr), dtype=bool)
    is_valid[order] = _last_of_each_user(
        tr.users[order], lambda counts: np.minimum(np.round(counts * share), counts - 1).astype(np.int64))
    if not is_valid.any():
        return data

    def part(mask: np.ndarray) -> Split:
        return Split(tr.users[mask], tr.items[mask], None if tr.ts is None else tr.ts[mask])

    return InteractionData(data.name, data.n_users, data.n_items, part(~is_valid), data.test, part(is_valid))


def _load_ml100k(path: Path) -> InteractionData:
    try:
        raw = np.loadtxt(path / "u.data", dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DatasetError(f"{path / 'u.data'}: expected `user<TAB>item<TAB>rating<TAB>unix_ts` lines ({exc})") from None
    if raw.shape[1] != 4 or len(raw) == 0:
        raise DatasetError(f"{path / 'u.data'}: expected 4 columns, got {raw.shape[1]}")
    users, user_ids = np.unique(raw[:, 0], return_inverse=True)
    items, item_ids = np.unique(raw[:, 1], return_inverse=True)
    train, test = temporal_split(user_ids, item_ids, raw[:, 3], test_fraction=0.2)
    return InteractionData(path.name, len(users), len(items), train, test)


REGISTRY: dict[str, DatasetSpec] = {
    "gowalla": DatasetSpec("gowalla", ("train.txt", "test.txt"), _load_lightgcn_style, False,
                           "LightGCN reference repository, data/gowalla"),
    "yelp2018": DatasetSpec("yelp2018", ("train.txt", "test.txt"), _load_lightgcn_style, False,
                            "LightGCN reference repository, data/yelp2018"),
    "amazon-book": DatasetSpec("amazon-book", ("train.txt", "test.txt"), _load_lightgcn_style, False,
                               "KGAT repository, data/amazon-book"),
    "ml-1m": DatasetSpec("ml-1m", ("train.txt", "valid.txt", "test.txt"),
                         lambda p: _load_lightgcn_style(p, with_valid=True), False,
                         "LightGCN++ preprocessed MovieLens-1M"),
    "gowalla-ts": DatasetSpec("gowalla-ts", ("train.txt", "test.txt", "time_train.txt", "time_test.txt"),
                              lambda p: _load_lightgcn_style(p, with_times=True), True,
                              "SNAP loc-gowalla check-ins, 10-core POI subset (SEP-GCN)"),
    "ml-100k": DatasetSpec("ml-100k", ("u.data",), _load_ml100k, True, "GroupLens MovieLens 100K"),
}
ALIASES = {"yelp": "yelp2018"}


def dataset_names() -> list[str]:
    return sorted(REGISTRY) + sorted(ALIASES)


def resolve_name(name: str) -> str:
    canonical = ALIASES.get(name, name)
    if canonical not in REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    return canonical


def load_dataset(name: str, data_dir: str | Path | None = None) -> InteractionData:
    """Load a registered dataset from `data_dir` (default: `$GNAQ_DATA_DIR` or ../shared/data)."""
    spec = REGISTRY[resolve_name(name)]
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = folder / spec.folder
    missing = [f for f in spec.files if not (folder / f).is_file()]
    if missing:
        raise DatasetError(
            f"dataset {spec.folder!r}: folder {folder} lacks {', '.join(missing)} "
            f"(expected files: {', '.join(spec.files)}; public source: {spec.source}; "
            f"set --data-dir or {DATA_DIR_ENV})"
        )
    try:
        return spec.loader(folder)
    except OSError as exc:
        raise DatasetError(f"dataset {spec.folder!r}: cannot read {folder}: {exc}") from None
