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
def propagate_with_aggregate(adj: torch.Tensor, layer0: torch.Tensor,
                             n_layers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final embeddings, the 1-hop normalised neighbour aggregate (`adj @ layer0`) and layer L from
    one propagation, without autograd (the aggregate is its first layer, not another product).
    (L + 1) * final - layer L is a node's sum of layers 0..L-1: what it passes on to its neighbours'
    final embeddings."""
    final, first, last = _layers(adj, layer0, n_layers)
    return final, (first if first is not None else torch.sparse.mm(adj, layer0)), last


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
