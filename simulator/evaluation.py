"""The block evaluation rule, the same for every model so that their numbers compare (EVALUATION_RULE)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from gnaq_stream.checkpoint import StoredModel
from gnaq_stream.config import LearnerConfig
from gnaq_stream.data.datasets import Split
from gnaq_stream.errors import GnaqError
from gnaq_stream.graph.interaction_graph import normalized_adjacency
from gnaq_stream.model.lightgcn import propagate
from gnaq_stream.store.embedding_store import EmbeddingStore
from gnaq_stream.stream.learner import StreamLearner
from gnaq_stream.train.evaluation import evaluate_ranking, interaction_matrix

EVALUATION_RULE = (
    "a block is scored with the model as it was before the block: for every user with a new interaction in "
    "the block, every item the model knows is ranked, the user's history (all interactions before the block) "
    "is masked, and the truth is the block's (user, item) pairs not already in that history (a masked item "
    "cannot be recommended, so a repeat cannot be predicted); interactions whose user or item the model has "
    "never seen are misses: they stay in the denominators and can never be hit. Recall@20 and NDCG@20 are "
    "averaged over those users; the same rule for every model"
)
K = 20
UNKNOWN_ITEM_SCORE = -1e30  # below any real score, above the -inf of masked history


@dataclass(frozen=True)
class Embeddings:
    """A model's final (propagated) embeddings by replay id: row k of `users` is user `user_ids[k]`."""

    user_ids: np.ndarray
    users: torch.Tensor
    item_ids: np.ndarray
    items: torch.Tensor


@torch.no_grad()
def model_embeddings(model: StoredModel) -> Embeddings:
    """Final embeddings of an offline model, propagated over its own training edges."""
    adj = normalized_adjacency(model.n_users, model.n_items, model.edges[:, 0], model.edges[:, 1])
    final = propagate(adj, model.layer0(), model.n_layers)
    return Embeddings(np.arange(model.n_users), final[:model.n_users], np.arange(model.n_items),
                      final[model.n_users:])


def store_embeddings(store: str | Path) -> Embeddings:
    """Final embeddings of the streaming learner, from a read-only snapshot of its store."""
    with EmbeddingStore(store, read_only=True) as s:
        learner = StreamLearner.from_state(s.load(LearnerConfig()))
    return learner_embeddings(learner)


def learner_embeddings(learner: StreamLearner) -> Embeddings:
    """Final embeddings of a streaming learner as it is now (a full propagation)."""
    learner.refresh_final_embeddings(force=True)
    g = learner.graph
    return Embeddings(np.array(g.users.external, dtype=np.int64), learner.final_users,
                      np.array(g.items.external, dtype=np.int64), learner.final_items)


def evaluate_block(emb: Embeddings, history: Split, block: Split) -> dict[str, float]:
    """Recall@K / NDCG@K (K = 10, 20) of `emb` on `block` under the rule above, plus counts."""
    n_users = int(max(history.users.max(), block.users.max(), emb.user_ids.max(initial=-1))) + 1
    n_items = int(max(history.items.max(), block.items.max(), emb.item_ids.max(initial=-1))) + 1
    seen = interaction_matrix(n_users, n_items, history)
    truth = interaction_matrix(n_users, n_items, block)
    truth = (truth - truth.multiply(seen)).tocsr()
    truth.eliminate_zeros()
    known_user = np.zeros(n_users, dtype=bool)
    known_user[emb.user_ids] = True
    known_item = np.zeros(n_items, dtype=bool)
    known_item[emb.item_ids] = True
    has_truth = np.diff(truth.indptr) > 0
    known_truth = sp.diags(known_user.astype(np.float32)) @ truth  # unknown users: scored 0 below
    candidates = known_item.sum() - np.asarray(seen[:, known_item].sum(axis=1)).ravel()
    if (candidates[known_user & has_truth] < K).any():
        raise GnaqError(f"a user has fewer than {K} unseen items known to the model: cannot rank a top {K}")
    # an extra dimension pushes items the model does not know below every known one, without
    # materialising a users x unknown-items mask
    dim = emb.users.shape[1]
    users = torch.zeros(n_users, dim + 1)
    users[torch.from_numpy(emb.user_ids), :dim] = emb.users
    users[:, dim] = 1.0
    items = torch.zeros(n_items, dim + 1)
    items[torch.from_numpy(emb.item_ids), :dim] = emb.items
    items[torch.from_numpy(~known_item), dim] = UNKNOWN_ITEM_SCORE
    metrics = evaluate_ranking(users, items, known_truth, seen)
    n_scored, n_all = int((known_user & has_truth).sum()), int(has_truth.sum())
    share = n_scored / n_all if n_all else 0.0  # users the model has never seen contribute 0
    out = {name: value * share for name, value in metrics.items()}
    pairs = truth.tocoo()
    unknown = ~known_user[pairs.row] | ~known_item[pairs.col]
    out.update(users=n_all, interactions=int(truth.nnz), unknown_users=n_all - n_scored,
               unknown_interactions=int(unknown.sum()))
    return out
