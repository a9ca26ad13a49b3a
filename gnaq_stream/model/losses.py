"""Ranking losses over (user, positive, negatives) candidate sets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking: -log sigmoid(s_pos - s_neg), averaged over every pair.

    pos_scores: (B,); neg_scores: (B, K).
    """
    return F.softplus(neg_scores - pos_scores.unsqueeze(1)).mean()


def lambda_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """LambdaRank-style loss: each (positive, negative) pair's logistic loss weighted by |ΔNDCG|.

    The candidate list of a row is its positive (relevance 1) and K negatives (relevance 0); ranks
    come from the current scores. Swapping the positive at rank r_p with a negative at rank r_n
    changes NDCG (IDCG = 1) by |1/log2(1+r_p) - 1/log2(1+r_n)|, so pairs that would move the
    positive across the top of the list weigh most.
    """
    with torch.no_grad():
        scores = torch.cat([pos_scores.unsqueeze(1), neg_scores], dim=1)
        ranks = scores.argsort(dim=1, descending=True).argsort(dim=1).float() + 1.0
        discount = 1.0 / torch.log2(1.0 + ranks)
        delta = (discount[:, :1] - discount[:, 1:]).abs()
    pair_loss = F.softplus(neg_scores - pos_scores.unsqueeze(1))
    return (delta * pair_loss).sum(dim=1).mean()
