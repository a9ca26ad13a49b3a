"""LightGCN propagation: the mean of layers 0..L of repeated normalised-adjacency products."""

from __future__ import annotations

import torch


def _layers(adj: torch.Tensor, x: torch.Tensor, n_layers: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean of layers 0..L, layer 1: each node's normalised neighbour sum; None when L = 0)."""
    acc, first = x.clone(), None
    for _ in range(n_layers):
        x = torch.sparse.mm(adj, x)
        first = x if first is None else first
        acc += x
    return acc / (n_layers + 1), first


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
def propagate_with_aggregate(adj: torch.Tensor, layer0: torch.Tensor, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Final embeddings and the 1-hop normalised neighbour aggregate (`adj @ layer0`) from one
    propagation, without autograd: the aggregate is its first layer, not another product."""
    final, first = _layers(adj, layer0, n_layers)
    return final, (first if first is not None else torch.sparse.mm(adj, layer0))
