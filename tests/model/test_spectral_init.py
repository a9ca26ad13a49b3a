"""The spectral initialisation: the graph's top singular vectors, a fixed point of LightGCN's
propagation up to a per-component scale."""

import numpy as np
import torch

from gnaq_stream.graph.interaction_graph import normalized_adjacency
from gnaq_stream.model.lightgcn import propagate, spectral_init


def _graph(seed: int = 0):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 30, 200)
    items = rng.integers(0, 40, 200)
    return users, items


def test_each_component_is_scaled_by_the_propagation_not_mixed():
    users, items = _graph()
    table = spectral_init(30, 40, users, items, dim=8, row_norm=1.0)
    assert table.shape == (70, 8)
    torch.testing.assert_close(table.norm(dim=1).mean(), torch.tensor(1.0))
    out = propagate(normalized_adjacency(30, 40, users, items), table, 3)
    # column j of the output is column j of the input times (1 + s + s^2 + s^3) / 4, s its singular value
    scale = (out * table).sum(0) / table.square().sum(0)
    torch.testing.assert_close(out, table * scale, atol=1e-5, rtol=1e-4)
    assert (scale >= 0.25).all() and (scale <= 1.0 + 1e-5).all()  # singular values lie in [0, 1]


def test_deterministic_and_ranks_the_graphs_own_items_high():
    users, items = _graph(1)
    a = spectral_init(30, 40, users, items, dim=8, row_norm=1.0)
    assert torch.equal(a, spectral_init(30, 40, users, items, dim=8, row_norm=1.0))
    scores = a[:30] @ a[30:].T
    seen = torch.zeros(30, 40, dtype=torch.bool)
    seen[torch.from_numpy(users), torch.from_numpy(items)] = True
    assert scores[seen].mean() > scores[~seen].mean() + 3 * scores[~seen].std() / seen.sum().sqrt()
