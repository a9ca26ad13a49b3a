import numpy as np
import pytest
import torch

from gnaq_stream.graph.interaction_graph import InteractionGraph
from gnaq_stream.model.lightgcn import propagate, propagate_items


def _layers(adj: torch.Tensor, x: torch.Tensor, n_layers: int) -> list[torch.Tensor]:
    out = [x]
    for _ in range(n_layers):
        out.append(torch.sparse.mm(adj, out[-1]))
    return out


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_the_items_side_equals_the_items_rows_of_the_whole_propagation(n_layers):
    rng = np.random.default_rng(0)
    g = InteractionGraph()
    users = g.add_users([str(u) for u in rng.integers(0, 40, 300)])
    g.add_interactions(users, g.add_items([str(i) for i in rng.integers(0, 25, 300)]))
    g.add_users(["isolated"])  # a user without edges
    layer0 = torch.randn(g.n_users + g.n_items, 16, generator=torch.Generator().manual_seed(0))
    adj, nu = g.normalized_adjacency(), g.n_users
    final, first, last = propagate_items(*g.adjacency_blocks_snapshot()(), layer0[:nu], layer0[nu:], n_layers)
    layers = _layers(adj, layer0, n_layers)
    torch.testing.assert_close(final, propagate(adj, layer0, n_layers)[nu:])
    torch.testing.assert_close(first, layers[1][nu:])
    torch.testing.assert_close(last, layers[-1][nu:])
