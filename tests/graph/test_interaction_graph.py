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
    u = g.add_users(["alice"])
    i, j = g.add_items(["x", "y"])
    assert g.add_interactions(u, [i]) == 1
    assert g.add_interactions(u, [i]) == 0
    assert g.add_interactions(u, [j]) == 1
    assert (g.n_users, g.n_items, g.n_edges, g.n_events) == (1, 2, 2, 3)
    assert g.add_users(["alice"]).tolist() == u.tolist()
    assert g.user_degrees().tolist() == [2] and g.item_degrees().tolist() == [1, 1]
    assert g.item_degrees(np.array([1, 1, 0])).tolist() == [1, 1, 1]
    static = normalized_adjacency(1, 2, np.array([0, 0]), np.array([0, 1]))
    assert torch.equal(g.normalized_adjacency().to_dense(), static.to_dense())


def test_a_batch_with_repeated_new_ids_and_edges():
    g = InteractionGraph()
    users = g.add_users(["a", "b", "a", "c", "b"])
    assert users.tolist() == [0, 1, 0, 2, 1] and g.users.external == ["a", "b", "c"]
    items = g.add_items(["x", "x", "x", "y", "x"])
    assert g.add_interactions(users, items) == 3  # (a, x) twice, (b, x) twice, (c, y) once
    assert g.edge_events == {0 << 32 | 0: 2, 1 << 32 | 0: 2, 2 << 32 | 1: 1} and g.n_events == 5
    assert g.item_users[0] == [0, 1] and g.user_items[2] == [1] and len(g.item_users) == 2
