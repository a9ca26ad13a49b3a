"""The bipartite user-item graph as one square matrix over nodes [users..., items...]."""

from __future__ import annotations

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

    def add(self, ext: str) -> int:
        """Index of `ext`, appending it when unseen."""
        idx = self.index.get(ext)
        if idx is None:
            idx = self.index[ext] = len(self.external)
            self.external.append(ext)
        return idx


class InteractionGraph:
    """A growable bipartite graph: id maps, adjacency lists, degrees and per-edge event counts.

    Adding an event costs O(1) (dict and list appends); the normalised adjacency of the whole graph
    is built on demand (`normalized_adjacency`).
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

    def add_user(self, ext: str) -> int:
        idx = self.users.add(ext)
        if idx == len(self.user_items):
            self.user_items.append([])
        return idx

    def add_item(self, ext: str) -> int:
        idx = self.items.add(ext)
        if idx == len(self.item_users):
            self.item_users.append([])
        return idx

    def add_interaction(self, user: int, item: int, events: int = 1) -> bool:
        """Record `events` interactions on (user, item); True when the edge is new."""
        key = user << 32 | item
        count = self.edge_events.get(key)
        self.edge_events[key] = (count or 0) + events
        self.n_events += events
        if count is None:
            self.user_items[user].append(item)
            self.item_users[item].append(user)
            return True
        return False

    def user_degrees(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.user_items), dtype=np.int64, count=self.n_users)

    def item_degrees(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.item_users), dtype=np.int64, count=self.n_items)

    def edge_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        keys = np.fromiter(self.edge_events.keys(), dtype=np.int64, count=self.n_edges)
        return keys >> 32, keys & 0xFFFFFFFF

    def normalized_adjacency(self) -> torch.Tensor:
        # edges are unique by construction: skipping the dedupe sort saves most of a refresh
        return _adjacency_of_unique(self.n_users, self.n_items, *self.edge_arrays())
