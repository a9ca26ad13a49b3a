"""LightGCN propagation: the mean of layers 0..L of repeated normalised-adjacency products."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import svds

from gnaq_stream.graph.interaction_graph import unique_edges


def _layers(adj: torch.Tensor, x: torch.Tensor, n_layers: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(mean of layers 0..L, layer 1: each node's normalised neighbour sum (None when L = 0), layer L)."""
    acc, first = x.clone(), None
    for _ in range(n_layers):
        x = torch.sparse.mm(adj, x)
        first = x if first is None else first
        acc += x
    return acc / (n_layers + 1), first, x


def _layer_mean(adj: torch.Tensor, x: torch.Tensor, n_layers: int) -> torch.Tensor:
    return _layers(adj, x, n_layers)[0]


class _LayerMean(torch.autograd.Function):
    # The adjacency is symmetric, so the backward of the layer mean is the same layer mean applied
    # to the gradient: no per-layer activations are kept, which halves a step's cost on CPU.
    @staticmethod
    def forward(ctx, adj: torch.Tensor, x: torch.Tensor, n_layers: int) -> torch.Tensor:
        ctx.adj, ctx.n_layers = adj, n_layers
        return _layer_mean(adj, x, n_layers)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, _layer_mean(ctx.adj, grad.contiguous(), ctx.n_layers), None


def propagate(adj: torch.Tensor, layer0: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Final LightGCN embeddings of all nodes from their layer-0 embeddings (differentiable)."""
    return _LayerMean.apply(adj, layer0, n_layers)


@torch.no_grad()
def propagate_items(r: torch.Tensor, r_t: torch.Tensor, users0: torch.Tensor, items0: torch.Tensor,
                    n_layers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The items' side of a propagation, from the blocks R (users x items) and R^T of the normalised
    adjacency: items' final embeddings, their layer 1 (the neighbour aggregate) and layer L, without
    autograd. Items' layer k is R^T times users' layer k-1, and users' layer k is R times items'
    layer k-1, so users' layer L is never needed: 2L - 1 products instead of 2L, and at most two
    users' layers held at once (users are most of the nodes). (L + 1) * final - layer L is an item's
    sum of layers 0..L-1: what it passes on to its users' final embeddings."""
    acc, users, items, first = items0.clone(), users0, items0, None
    for k in range(1, n_layers + 1):
        following = torch.sparse.mm(r_t, users)
        users = None  # freed before the next users' layer is made
        if k < n_layers:
            users = torch.sparse.mm(r, items)
        items = following
        first = items if first is None else first
        acc += items
    return acc / (n_layers + 1), (first if first is not None else torch.sparse.mm(r_t, users0)), items


def spectral_init(n_users: int, n_items: int, users: np.ndarray, items: np.ndarray, dim: int,
                  row_norm: float) -> torch.Tensor:
    """Layer-0 embeddings from the top-`dim` singular vectors of the normalised interaction matrix
    D_u^-1/2 R D_i^-1/2, each scaled by its singular value, rows rescaled to a mean norm of `row_norm`.

    Such a table is a fixed point of the propagation up to scale: every layer multiplies a
    component by its singular value, so training starts from a low-pass filter of the graph instead
    of noise (measured in docs/benchmarks.md, "Full-precision recipe").
    """
    u, i = unique_edges(np.asarray(users), np.asarray(items))
    deg_u, deg_i = np.bincount(u, minlength=n_users), np.bincount(i, minlength=n_items)
    values = 1.0 / np.sqrt(deg_u[u] * deg_i[i].astype(np.float64))
    matrix = sp.csr_matrix((values, (u, i)), shape=(n_users, n_items))
    k = min(dim, min(n_users, n_items) - 1)
    left, sigma, right_t = svds(matrix, k=k, v0=np.ones(min(n_users, n_items)) / 2, random_state=0)
    table = np.zeros((n_users + n_items, dim), dtype=np.float32)
    table[:n_users, :k], table[n_users:, :k] = left * sigma, right_t.T * sigma
    out = torch.from_numpy(table)
    return out * (row_norm / out.norm(dim=1).mean().clamp_min(1e-12))
