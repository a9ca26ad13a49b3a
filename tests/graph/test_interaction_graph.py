import numpy as np
import torch

from gnaq_stream.graph.interaction_graph import InteractionGraph, normalized_adjacency


def test_normalized_adjacency_by_hand():
    # users 0,1; items 0,1; edges u0-i0, u0-i1, u1-i0 (plus a repeat of u0-i0)
    adj = normalized_adjacency(2, 2, np.array([0, 0, 1, 0]), np.array([0, 1, 0, 0])).to_dense()
    deg = {"u0": 2, "u1": 1, "i0": 2, "i1": 1}
    assert adj[0, 2] == torch.tensor(1 / np.sqrt(deg["u0"] * deg["i0"]), dtype=torch.float32)
    assert adj[0, 3] == torch.tensor(1 / np.sqrt(deg["u0"] * deg["i1"]), dtype=torch.float32)
    assert torch.equal(adj, adj.T)
    assert adj[0, 1] == 0 and adj[2, 3] == 0


def test_growable_graph_counts_events_and_edges():
    g = InteractionGraph()
    u, i, j = g.add_user("alice"), g.add_item("x"), g.add_item("y")
    assert g.add_interaction(u, i) is True
    assert g.add_interaction(u, i) is False
    assert g.add_interaction(u, j) is True
    assert (g.n_users, g.n_items, g.n_edges, g.n_events) == (1, 2, 2, 3)
    assert g.add_user("alice") == u
    assert g.user_degrees().tolist() == [2] and g.item_degrees().tolist() == [1, 1]
    static = normalized_adjacency(1, 2, np.array([0, 0]), np.array([0, 1]))
    assert torch.equal(g.normalized_adjacency().to_dense(), static.to_dense())
