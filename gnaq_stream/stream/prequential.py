"""Prequential (test-then-train) accuracy: every event is scored before the model learns from it."""

from __future__ import annotations

from collections import deque
from itertools import chain

import numpy as np
import torch

from gnaq_stream.data.events import Event
from gnaq_stream.stream.learner import StreamLearner

KS = (10, 20)


class PrequentialEvaluator:
    """Rank of each sampled event's item among all items for its user, under the model as it was
    before the event's micro-batch; Recall@K / NDCG@K over a sliding window of scored events.

    One target per event, so Recall@K is the hit rate and NDCG@K = 1/log2(rank + 2) for a hit.
    Items the user already interacted with (other than the target) are masked. An event whose user
    or item the model has never seen counts as a miss: the model could not have recommended it.
    """

    def __init__(self, window: int, sample: float, seed: int = 0):
        self.ranks: deque[float] = deque(maxlen=window)
        self.sample = sample
        self.rng = np.random.default_rng(seed)

    @torch.no_grad()
    def score(self, learner: StreamLearner, events: list[Event]) -> None:
        if not events or self.sample <= 0:
            return
        picked = [events[k] for k in np.flatnonzero(self.rng.random(len(events)) < self.sample).tolist()]
        if not picked:
            return
        learner.refresh_final_embeddings()
        g = learner.graph
        n_items = learner.final_items.shape[0]
        known = []
        for ev in picked:
            u, i = g.users.get(ev.user), g.items.get(ev.item)
            if u is None or i is None or u >= learner.final_users.shape[0] or i >= n_items:
                self.ranks.append(float("inf"))
            else:
                known.append((u, i))
        if not known:
            return
        users = torch.tensor([u for u, _ in known])
        targets = torch.tensor([i for _, i in known])
        scores = learner.final_users[users] @ learner.final_items_t
        target_scores = scores.gather(1, targets.unsqueeze(1))
        histories = [g.user_items[u] for u, _ in known]
        lengths = torch.tensor([len(h) for h in histories])
        seen = torch.tensor(list(chain.from_iterable(histories)), dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(len(known)), lengths)
        inside = seen < n_items
        scores[rows[inside], seen[inside]] = float("-inf")  # the user's history is not recommended...
        scores.scatter_(1, targets.unsqueeze(1), target_scores)  # ...unless it is the target (a repeat)
        self.ranks.extend((scores > target_scores).sum(1).tolist())

    def metrics(self) -> dict[str, float]:
        if not self.ranks:
            return {}
        r = np.asarray(self.ranks)
        out = {}
        for k in KS:
            hit = r < k
            out[f"recall@{k}"] = float(hit.mean())
            out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(np.minimum(r, k) + 2), 0.0).mean())
        return out
