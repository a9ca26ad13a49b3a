"""Full-ranking Recall@K and NDCG@K: every item is ranked for every test user, known items masked."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from gnaq_stream.data.datasets import Split


def interaction_matrix(n_users: int, n_items: int, *splits: Split) -> sp.csr_matrix:
    """Binary user x item CSR matrix of the given splits."""
    users = np.concatenate([s.users for s in splits])
    items = np.concatenate([s.items for s in splits])
    m = sp.csr_matrix((np.ones(len(users), dtype=np.float32), (users, items)), shape=(n_users, n_items))
    m.data[:] = 1.0
    return m


def _chunk_mask(m: sp.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    sub = m[rows].tocoo()
    mask = torch.zeros(len(rows), m.shape[1], dtype=torch.bool)
    mask[torch.from_numpy(sub.row.astype(np.int64)), torch.from_numpy(sub.col.astype(np.int64))] = True
    return mask


@torch.no_grad()
def evaluate_ranking(user_emb: torch.Tensor, item_emb: torch.Tensor, truth: sp.csr_matrix,
                     exclude: sp.csr_matrix, ks: tuple[int, ...] = (10, 20), chunk: int = 2048,
                     progress: bool = False) -> dict[str, float]:
    """Mean Recall@K and NDCG@K over users with at least one truth item.

    Scores are user_emb @ item_emb.T; items in `exclude` (training history) are never ranked.
    """
    n_truth = np.asarray(truth.sum(axis=1)).ravel()
    users = np.flatnonzero(n_truth > 0)
    kmax = max(ks)
    discounts = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64))
    ideal = torch.cumsum(discounts, 0)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    for start in tqdm(range(0, len(users), chunk), desc="evaluate", disable=not progress, leave=False):
        rows = users[start:start + chunk]
        scores = user_emb[torch.from_numpy(rows)] @ item_emb.T
        scores.masked_fill_(_chunk_mask(exclude, rows), float("-inf"))
        top = scores.topk(kmax, dim=1).indices
        hits = _chunk_mask(truth, rows).gather(1, top).double()
        n_rel = torch.from_numpy(n_truth[rows]).double()
        for k in ks:
            sums[f"recall@{k}"] += (hits[:, :k].sum(1) / n_rel).sum().item()
            dcg = (hits[:, :k] * discounts[:k]).sum(1)
            idcg = ideal[(n_rel.clamp(max=k) - 1).long()]
            sums[f"ndcg@{k}"] += (dcg / idcg).sum().item()
    return {name: total / max(len(users), 1) for name, total in sums.items()}


def popularity_scores(n_users: int, history: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor]:
    """User and item 'embeddings' whose product ranks items by training popularity."""
    degree = torch.from_numpy(np.asarray(history.sum(axis=0)).ravel().astype(np.float32))
    return torch.ones(n_users, 1), degree.unsqueeze(1)
