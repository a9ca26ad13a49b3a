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
    u, i = unique_edges(users, items, n_items)
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
