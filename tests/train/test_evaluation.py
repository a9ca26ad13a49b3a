import math

import numpy as np
import pytest
import torch

from gnaq_stream.data.datasets import Split
from gnaq_stream.train.evaluation import evaluate_ranking, interaction_matrix


def test_metrics_on_hand_made_ranking():
    # one user, 5 items, scores rank items 4,3,2,1,0; item 4 is training history (masked)
    user = torch.ones(1, 1)
    items = torch.arange(5, dtype=torch.float32).unsqueeze(1)
    history = interaction_matrix(1, 5, Split(np.array([0]), np.array([4])))
    truth = interaction_matrix(1, 5, Split(np.array([0, 0]), np.array([3, 0])))
    m = evaluate_ranking(user, items, truth, history, ks=(1, 2, 4))
    # ranking after masking: 3, 2, 1, 0 -> hits at ranks 1 and 4
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["recall@4"] == pytest.approx(1.0)
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg@1"] == pytest.approx(1.0)
    assert m["ndcg@2"] == pytest.approx(1 / idcg)
    assert m["ndcg@4"] == pytest.approx((1 + 1 / math.log2(5)) / idcg)


def test_users_without_truth_are_skipped():
    user = torch.ones(2, 1)
    items = torch.arange(3, dtype=torch.float32).unsqueeze(1)
    truth = interaction_matrix(2, 3, Split(np.array([1]), np.array([2])))
    history = interaction_matrix(2, 3, Split(np.array([], dtype=np.int64), np.array([], dtype=np.int64)))
    assert evaluate_ranking(user, items, truth, history, ks=(1,))["recall@1"] == 1.0
