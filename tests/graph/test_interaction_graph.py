from collections import Counter

import numpy as np
import pytest
import torch

from gnaq_stream.graph import interaction_graph
from gnaq_stream.graph.interaction_graph import IdMap, InteractionGraph, normalized_adjacency


def test_normalized_adjacency_by_hand():
    # users 0,1; items 0,1; edges u0-i0, u0-i1, u1-i0 (plus a repeat of u0-i0)
    adj = normalized_adjacency(2, 2, np.array([0, 0, 1, 0]), np.array([0, 1, 0, 0])).to_dense()
    deg = {"u0": 2, "u1": 1, "i0": 2, "i1": 1}
    assert adj[0, 2].item() == pytest.approx(1 / np.sqrt(deg["u0"] * deg["i0"]), rel=1e-6)
    assert adj[0, 3].item() == pytest.approx(1 / np.sqrt(deg["u0"] * deg["i1"]), rel=1e-6)
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
    u, i, counts = g.edges()
    assert list(zip(u.tolist(), i.tolist(), counts.tolist())) == [(0, 0, 2), (1, 0, 2), (2, 1, 1)]
    assert g.n_events == 5
    assert g.item_users[0].tolist() == [0, 1] and g.user_items[2].tolist() == [1]


def _reference(batches):
    counts = Counter()
    for users, items in batches:
        counts.update(zip(users, items))
    return counts


@pytest.mark.parametrize("merge_edges", [7, 1 << 18])
def test_array_graph_matches_a_reference_built_from_the_same_events(monkeypatch, merge_edges):
    """Edges, counts, degrees, neighbour lists and adjacency equal a plain dict built from the same
    events, whether batches are merged often (tiny merge threshold) or stay pending."""
    monkeypatch.setattr(interaction_graph, "MERGE_EDGES", merge_edges)
    rng = np.random.default_rng(0)
    g, batches = InteractionGraph(), []
    for _ in range(30):
        n = int(rng.integers(1, 40))
        users = [f"u{k}" for k in rng.zipf(1.5, n) % 60]
        items = [f"i{k}" for k in rng.zipf(1.3, n) % 45]
        batches.append((users, items))
        g.add_interactions(g.add_users(users), g.add_items(items))
    ref = _reference(batches)
    uid, iid = {e: k for k, e in enumerate(g.users.external)}, {e: k for k, e in enumerate(g.items.external)}
    assert g.n_events == sum(ref.values()) and g.n_edges == len(ref)
    assert set(g.users.external) == {u for u, _ in ref} and len(set(g.users.external)) == g.n_users
    for k, e in enumerate(g.users.external):
        assert g.users.get(e) == k
    assert g.users.get("nobody") is None
    by_user, by_item = {}, {}
    for (u, i) in ref:
        by_user.setdefault(uid[u], set()).add(iid[i])
        by_item.setdefault(iid[i], set()).add(uid[u])
    assert g.user_degrees().tolist() == [len(by_user.get(u, ())) for u in range(g.n_users)]
    assert g.item_degrees().tolist() == [len(by_item.get(i, ())) for i in range(g.n_items)]
    users = np.array([3, 0, 3, g.n_users - 1])
    owner, items = g.items_of_users(users)
    for k, u in enumerate(users.tolist()):
        assert sorted(items[owner == k].tolist()) == sorted(by_user[u])
    asked = np.array([0, 2, 0, g.n_items - 1])
    owner, found = g.users_of_items(asked)
    for k, i in enumerate(asked.tolist()):
        assert sorted(found[owner == k].tolist()) == sorted(by_item[i])
    owner, _ = g.users_of_items(asked, cap=2)
    assert np.bincount(owner, minlength=4).tolist() == [min(2, len(by_item[i])) for i in asked.tolist()]
    edges = list(ref)
    static = normalized_adjacency(g.n_users, g.n_items, np.array([uid[u] for u, _ in edges]),
                                  np.array([iid[i] for _, i in edges]))
    assert torch.equal(g.normalized_adjacency().to_dense(), static.to_dense())
    u, i, counts = g.edges()
    assert {(g.users.external[a], g.items.external[b]): c for a, b, c in zip(u, i, counts)} == dict(ref)


def _same_graph(a: InteractionGraph, b: InteractionGraph) -> None:
    for x, y in zip(a.edges(), b.edges()):
        assert np.array_equal(x, y)
    assert np.array_equal(a.user_degrees(), b.user_degrees()) and np.array_equal(a.item_degrees(), b.item_degrees())
    for side in ("items_of_users", "users_of_items"):
        nodes = np.arange(a.n_users if side == "items_of_users" else a.n_items)
        (owner_a, of_a), (owner_b, of_b) = getattr(a, side)(nodes), getattr(b, side)(nodes)
        assert np.array_equal(owner_a, owner_b)  # grouped by node, the same number each
        order_a, order_b = np.lexsort((of_a, owner_a)), np.lexsort((of_b, owner_b))
        assert np.array_equal(of_a[order_a], of_b[order_b])  # the same neighbours (in the store's order)
    assert torch.equal(a.normalized_adjacency().to_dense(), b.normalized_adjacency().to_dense())


@pytest.mark.parametrize("merge_edges", [7, 1 << 18])
def test_a_snapshot_loaded_into_an_empty_graph_equals_the_graph_it_came_from(monkeypatch, merge_edges):
    """Edges with counts into an empty graph (a restart) take a one-pass path: the result is the graph
    the edges came from (neighbours in id order rather than arrival order, as a snapshot keeps them),
    and it goes on growing like it."""
    monkeypatch.setattr(interaction_graph, "MERGE_EDGES", merge_edges)
    rng = np.random.default_rng(1)
    source, restored = InteractionGraph(), InteractionGraph()
    batches = [([f"u{k}" for k in rng.zipf(1.5, 30) % 50], [f"i{k}" for k in rng.zipf(1.3, 30) % 40])
               for _ in range(20)]
    for users, items in batches[:10]:
        source.add_interactions(source.add_users(users), source.add_items(items))
    restored.add_users(source.users.external)
    restored.add_items(source.items.external)
    restored.edges()  # row starts already sized for these nodes: the load must still set them
    users, items, counts = source.edges()
    shuffled = rng.permutation(len(users))  # a snapshot in any order
    assert restored.add_interactions(users[shuffled], items[shuffled], counts[shuffled]) == len(users)
    assert restored.n_events == source.n_events
    _same_graph(source, restored)
    for users, items in batches[10:]:
        for g in (source, restored):
            g.add_interactions(g.add_users(users), g.add_items(items))
    _same_graph(source, restored)


class _SameHash(str):
    """An id whose hash collides with every other such id."""

    def __hash__(self) -> int:
        return 42


def test_id_map_tells_apart_ids_whose_hashes_collide(monkeypatch):
    monkeypatch.setattr(interaction_graph, "MERGE_IDS", 2)
    ids = IdMap()
    first = ids.add_all([_SameHash(f"id{k}") for k in range(5)])  # merged into the hash index on the way
    again = ids.add_all([_SameHash(f"id{k}") for k in (4, 2, 0, 7)])
    assert first.tolist() == [0, 1, 2, 3, 4] and again.tolist() == [4, 2, 0, 5]
    assert ids.get(_SameHash("id3")) == 3 and ids.get(_SameHash("id9")) is None
    assert list(ids.external) == ["id0", "id1", "id2", "id3", "id4", "id7"]


def test_id_map_holds_any_utf8_id():
    ids = IdMap(["ß", "用户", "", "a" * 256])
    assert ids.add_all(["用户", "new"]).tolist() == [1, 4] and ids.external[-1] == "new" and ids.external[2] == ""
