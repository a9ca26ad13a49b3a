"""The bipartite user-item graph as one square matrix over nodes [users..., items...]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch


def unique_edges(users: np.ndarray, items: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop repeated (user, item) pairs: the graph is binary even where events repeat."""
    keys = np.unique(users.astype(np.int64) * n_items + items.astype(np.int64))
    return keys // n_items, keys % n_items


def normalized_adjacency(n_users: int, n_items: int, users: np.ndarray, items: np.ndarray) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the bipartite graph as a torch CSR tensor of shape (n_users+n_items)^2.

    Isolated nodes get empty rows, so their propagated embedding is their own layer-0 share only.
    """
    return _adjacency_of_unique(n_users, n_items, *unique_edges(users, items, n_items))


def _adjacency_of_unique(n_users: int, n_items: int, u: np.ndarray, i: np.ndarray) -> torch.Tensor:
    n = n_users + n_items
    rows = np.concatenate([u, i + n_users])
    cols = np.concatenate([i + n_users, u])
    deg = np.bincount(rows, minlength=n).astype(np.float64)
    inv_sqrt = np.zeros(n)
    np.divide(1.0, np.sqrt(deg), out=inv_sqrt, where=deg > 0)
    vals = (inv_sqrt[rows] * inv_sqrt[cols]).astype(np.float32)
    csr = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    csr.sort_indices()
    return torch.sparse_csr_tensor(
        torch.from_numpy(csr.indptr.astype(np.int64)),
        torch.from_numpy(csr.indices.astype(np.int64)),
        torch.from_numpy(csr.data),
        size=(n, n),
    )


class IdMap:
    """External ids (strings) <-> dense internal indices, in order of first appearance."""

    def __init__(self, external: list[str] | None = None):
        self.external: list[str] = list(external or [])
        self.index: dict[str, int] = {e: i for i, e in enumerate(self.external)}

    def __len__(self) -> int:
        return len(self.external)

    def get(self, ext: str) -> int | None:
        return self.index.get(ext)

    def add_all(self, exts: Sequence[str]) -> np.ndarray:
        """Indices of `exts`, appending the unseen ones in order of first appearance."""
        idx = list(map(self.index.get, exts))  # C-speed lookups: most ids are known
        if None in idx:
            for k, ext in enumerate(exts):
                if idx[k] is None:
                    found = self.index.get(ext)  # an id new in this batch may repeat within it
                    if found is None:
                        found = self.index[ext] = len(self.external)
                        self.external.append(ext)
                    idx[k] = found
        return np.array(idx, dtype=np.int64)


class InteractionGraph:
    """A growable bipartite graph: id maps, adjacency lists, degrees and per-edge event counts.

    Adding events costs O(events) (dict lookups and list appends, batched); the normalised adjacency
    of the whole graph is built on demand (`normalized_adjacency`).
    """

    def __init__(self) -> None:
        self.users, self.items = IdMap(), IdMap()
        self.user_items: list[list[int]] = []
        self.item_users: list[list[int]] = []
        self.edge_events: dict[int, int] = {}  # key u << 32 | i -> number of events on that edge
        self.n_events = 0

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_edges(self) -> int:
        return len(self.edge_events)

    def add_users(self, exts: Sequence[str]) -> np.ndarray:
        """Internal indices of these external user ids; unseen ids become new users."""
        idx = self.users.add_all(exts)
        self.user_items.extend([] for _ in range(self.n_users - len(self.user_items)))
        return idx

    def add_items(self, exts: Sequence[str]) -> np.ndarray:
        """Internal indices of these external item ids; unseen ids become new items."""
        idx = self.items.add_all(exts)
        self.item_users.extend([] for _ in range(self.n_items - len(self.item_users)))
        return idx

    def add_interactions(self, users: np.ndarray, items: np.ndarray) -> int:
        """Record one event per (user, item) pair of internal indices; returns how many edges are new."""
        keys, counts = np.unique(np.asarray(users, dtype=np.int64) << 32 | np.asarray(items, dtype=np.int64),
                                 return_counts=True)
        edges = self.edge_events
        before = list(map(edges.get, keys.tolist()))
        edges.update(zip(keys.tolist(), [c if b is None else b + c for b, c in zip(before, counts.tolist())]))
        fresh = keys[np.fromiter((b is None for b in before), dtype=bool, count=len(before))]
        user_items, item_users = self.user_items, self.item_users
        for u, i in zip((fresh >> 32).tolist(), (fresh & 0xFFFFFFFF).tolist()):
            user_items[u].append(i)
            item_users[i].append(u)
        self.n_events += len(users)
        return len(fresh)

    def user_degrees(self, users: np.ndarray | None = None) -> np.ndarray:
        """Distinct items of each user (all users, or these)."""
        return self._degrees(self.user_items, users)

    def item_degrees(self, items: np.ndarray | None = None) -> np.ndarray:
        """Distinct users of each item (all items, or these)."""
        return self._degrees(self.item_users, items)

    @staticmethod
    def _degrees(adjacency: list[list[int]], nodes: np.ndarray | None) -> np.ndarray:
        lists = adjacency if nodes is None else map(adjacency.__getitem__, nodes.tolist())
        return np.fromiter(map(len, lists), dtype=np.int64, count=len(adjacency) if nodes is None else len(nodes))

    def edge_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        keys = np.fromiter(self.edge_events.keys(), dtype=np.int64, count=self.n_edges)
        return keys >> 32, keys & 0xFFFFFFFF

    def normalized_adjacency(self) -> torch.Tensor:
        # edges are unique by construction: skipping the dedupe sort saves most of a refresh
        return _adjacency_of_unique(self.n_users, self.n_items, *self.edge_arrays())
