"""The trainer's negative sampler and L2 term, checked against their definitions."""

import numpy as np
import torch

from gnaq_stream.graph.interaction_graph import InteractionGraph, edge_test
from gnaq_stream.train.trainer import NegativeSampler, l2_penalty


def test_negatives_avoid_each_users_training_items_and_cover_the_rest():
    rng = np.random.default_rng(0)
    n_users, n_items = 50, 40
    users = np.repeat(np.arange(n_users), 30)  # 30 of 40 items each: most draws clash at first
    items = np.concatenate([rng.choice(n_items, 30, replace=False) for _ in range(n_users)])
    known = set(zip(users.tolist(), items.tolist()))
    sampler = NegativeSampler(edge_test(users, items), n_items, np.random.default_rng(1))
    batch = rng.integers(0, n_users, 2000)
    neg = sampler.sample(batch, 8)
    assert neg.shape == (2000, 8)
    clashes = sum((u, i) in known for u, row in zip(batch.tolist(), neg.tolist()) for i in row)
    # five redraws of a 3/4 clash rate leave (3/4)^6 ~ 18% of 16,000 draws on a positive at most
    assert clashes < 0.2 * neg.size
    free = {(u, i) for u in range(n_users) for i in range(n_items)} - known
    drawn = {(u, i) for u, row in zip(batch.tolist(), neg.tolist()) for i in row if (u, i) not in known}
    assert len(drawn) > 0.9 * len(free & {(u, i) for u in set(batch.tolist()) for i in range(n_items)})


def test_negatives_on_a_sparse_graph_never_hit_a_positive():
    rng = np.random.default_rng(2)
    users, items = rng.integers(0, 300, 3000), rng.integers(0, 5000, 3000)
    neg = NegativeSampler(edge_test(users, items), 5000, rng).sample(users, 8)
    known = set(zip(users.tolist(), items.tolist()))
    assert not any((u, i) in known for u, row in zip(users.tolist(), neg.tolist()) for i in row)


def test_a_growing_graph_knows_its_merged_and_pending_edges():
    rng = np.random.default_rng(3)
    graph = InteractionGraph()
    graph.add_users([f"u{k}" for k in range(40)])
    graph.add_items([f"i{k}" for k in range(60)])
    users, items = rng.integers(0, 40, 500), rng.integers(0, 60, 500)
    graph.add_interactions(users[:300], items[:300])
    graph.merge()
    graph.add_interactions(users[300:], items[300:])  # pending
    assert len(graph._pending) > 0
    pairs_u, pairs_i = np.repeat(np.arange(40), 60), np.tile(np.arange(60), 40)
    assert np.array_equal(graph.has_edges(pairs_u, pairs_i), edge_test(users, items)(pairs_u, pairs_i))
    assert graph.has_edges(pairs_u, pairs_i).sum() == len(set(zip(users.tolist(), items.tolist())))


def test_l2_is_the_batch_rows_squared_norm_with_repeats():
    torch.manual_seed(0)
    n_users, table = 10, torch.randn(30, 4, requires_grad=True)
    users, pos = torch.tensor([0, 0, 3]), torch.tensor([1, 5, 1])
    neg = torch.tensor([[2, 2], [7, 1], [19, 0]])
    l2_penalty(table, n_users, users, pos, neg, 0.5).backward()
    rows = torch.cat([users, n_users + pos, n_users + neg.reshape(-1)])
    expected_table = table.detach().clone().requires_grad_()
    (0.5 * expected_table[rows].square().sum() / (2 * 3)).backward()
    assert torch.allclose(table.grad, expected_table.grad)
    assert table.grad[0].abs().sum() > 0 and table.grad[4].abs().sum() == 0
