"""Prequential (test-then-train) accuracy: every event is scored before the model learns from it."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from gnaq_stream.data.events import Event
from gnaq_stream.stream.learner import StreamLearner

KS = (10, 20)
ITEM_BLOCK = 4096  # items scored at a time: the score block stays in cache (about 2x one big matmul)
# scored events a pass over a large catalogue gathers: a pass reads every item's final row whatever
# the number of users scored, so a handful of users per micro-batch made it memory-bound (17% of the
# learner's time at 460k items, py-spy); ~128 user rows make it compute-bound
PASS_ROWS = 128


def item_ranks(user_rows: torch.Tensor, items_t: torch.Tensor, targets: torch.Tensor, masked_rows: torch.Tensor,
               masked_items: torch.Tensor) -> torch.Tensor:
    """For each user row, how many items score strictly above its target item, not counting the
    masked items (row masked_rows[k] does not count item masked_items[k]; pairs distinct, never a
    row's own target).

    Items are scored a block at a time. A block counts every item above the target, then takes back
    the target and the masked items it counted, judged by the same block's scores, so the result does
    not depend on how the matmul rounds."""
    target_scores = (user_rows * items_t[:, targets].T).sum(1, keepdim=True)
    above = torch.zeros(len(user_rows), dtype=torch.int64)
    own = (torch.arange(len(targets)), targets)
    for start in range(0, items_t.shape[1], ITEM_BLOCK):
        block = user_rows @ items_t[:, start:start + ITEM_BLOCK]
        above += (block > target_scores).sum(1)
        for rows, items in (own, (masked_rows, masked_items)):
            inside = (items >= start) & (items < start + block.shape[1])
            rows, cols = rows[inside], items[inside] - start
            counted = block[rows, cols] > target_scores[rows, 0]
            above -= torch.bincount(rows[counted], minlength=len(above))
    return above


class PrequentialEvaluator:
    """Rank of each sampled event's item among all items for its user, under the model as it was
    before the event's micro-batch; Recall@K / NDCG@K over a sliding window of scored events.

    One target per event, so Recall@K is the hit rate and NDCG@K = 1/log2(rank + 2) for a hit.
    Items the user already interacted with (other than the target) are masked. An event whose user
    or item the model has never seen counts as a miss: the model could not have recommended it.
    """

    def __init__(self, window: int, sample: float, seed: int = 0, max_scores_per_event: int = 0):
        self.ranks: deque[float] = deque(maxlen=window)
        self.sample = sample
        self.max_scores_per_event = max_scores_per_event
        self.rng = np.random.default_rng(seed)

    def share(self, n_items: int) -> float:
        """Share of events scored: `sample`, less where scoring that share against every item would
        cost more than `max_scores_per_event` item scores per event (a large catalogue)."""
        if self.max_scores_per_event and n_items:
            return min(self.sample, self.max_scores_per_event / n_items)
        return self.sample

    def pick(self, n_events: int, n_items: int) -> np.ndarray:
        """Which of a micro-batch's events to score: each with probability `share`. Where the share is
        cut for a large catalogue, the batch is scored at all only with probability
        share * n_events / PASS_ROWS, and then its events at share / that probability: the same share
        in expectation, in passes of ~PASS_ROWS events (batches are chosen independently of their
        content, so the gauges are not biased)."""
        share = self.share(n_items)
        if share < self.sample:
            batch_share = min(1.0, share * n_events / PASS_ROWS)
            if self.rng.random() >= batch_share:
                return np.zeros(0, dtype=np.int64)
            share /= batch_share
        return np.flatnonzero(self.rng.random(n_events) < share)

    @torch.no_grad()
    def score(self, learner: StreamLearner, events: list[Event]) -> None:
        if not events or self.sample <= 0:
            return
        picked = [events[k] for k in self.pick(len(events), learner.graph.n_items).tolist()]
        if not picked:
            return
        learner.refresh_final_embeddings()
        g = learner.graph
        n_items = learner.final_items.shape[0]
        known = []
        for ev in picked:
            u, i = g.users.get(ev.user), g.items.get(ev.item)
            if u is None or i is None or u >= learner.context_users or i >= n_items:
                self.ranks.append(float("inf"))
            else:
                known.append((u, i))
        if not known:
            return
        users = torch.tensor([u for u, _ in known])
        targets = torch.tensor([i for _, i in known])
        owner, seen = g.items_of_users(users.numpy())
        rows, seen = torch.from_numpy(owner), torch.from_numpy(seen)
        # the user's history is not recommended, unless it is the target (a repeat); items added
        # since the last propagation have no score yet
        masked = (seen < n_items) & (seen != targets[rows])
        user_rows, _ = learner.current_final(users.numpy(), np.zeros(0, dtype=np.int64))
        ranks = item_ranks(user_rows, learner.final_items_t, targets, rows[masked], seen[masked])
        self.ranks.extend(ranks.tolist())

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
