"""The block evaluation rule on a case small enough to work out by hand."""

import math

import numpy as np
import pytest
import torch

from gnaq_stream.data.datasets import Split
from simulator.evaluation import Embeddings, evaluate_block


def split(pairs):
    return Split(np.array([u for u, _ in pairs]), np.array([i for _, i in pairs]))


def test_unseen_users_and_items_are_misses_and_history_is_masked():
    # items 0..24 known, score of item j = +j for user 0 and -j for user 1; item 25 and user 2 unknown
    emb = Embeddings(np.array([0, 1]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]),
                     np.arange(25), torch.stack([torch.arange(25.0), torch.zeros(25)], 1))
    history = split([(0, 24), (1, 10)])
    block = split([(0, 23), (0, 0), (0, 24), (0, 25), (1, 1), (2, 3)])
    out = evaluate_block(emb, history, block)
    # user 0: truth {23, 0, 25} (24 is a repeat of masked history); 23 ranks first, 0 is 24th, 25 unknown
    # user 1: truth {1}, ranked second (item 0 first); user 2: never seen, scores 0
    recall = (1 / 3 + 1 + 0) / 3
    ndcg0 = 1.0 / sum(1 / math.log2(r + 2) for r in range(3))
    ndcg1 = 1 / math.log2(3)
    assert out["recall@20"] == pytest.approx(recall)
    assert out["ndcg@20"] == pytest.approx((ndcg0 + ndcg1 + 0) / 3)
    assert (out["users"], out["interactions"], out["unknown_users"], out["unknown_interactions"]) == (3, 5, 1, 2)
