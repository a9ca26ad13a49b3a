"""Consolidation: full-graph GNAQ training steps the learner takes while the stream is idle.

Refinement only nudges the nodes a micro-batch touches, against a context that is held fixed; on the
yelp2018 replay that recovered little of what a retrain from scratch learns from the same new
interactions (docs/benchmarks.md). Consolidation runs the offline `gnaq` step itself over the whole
current graph: Adam on levels and latent of every node, BPR + LambdaLoss on uniformly sampled edges with
offline's negative sampler (uniform, the user's items excluded), codes re-derived by RAU after every
step. It spends an idle-time budget earned by streaming, in training pairs
(`consolidate_pairs_per_event` per applied event: work, not seconds, so a faster stream path does not
buy less learning), in slices short enough that a message arriving meanwhile waits at most one slice.
Its optimiser state lives until the next micro-batch changes the graph.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from gnaq_stream.config import LearnerConfig
from gnaq_stream.graph.interaction_graph import InteractionGraph
from gnaq_stream.model.gnaq import METHODS, QuantizedEmbedding, Recommender
from gnaq_stream.quant.node_table import NodeTable
from gnaq_stream.train.trainer import NegativeSampler, training_step


def earned(cfg: LearnerConfig, budget: float, events: int, n_edges: int) -> float:
    """The consolidation budget (training pairs) after `events` more applied events, capped at
    `consolidate_max_epochs` passes over the graph's edges: a stream that never goes idle does not
    build up a debt of hours of training."""
    return min(budget + cfg.consolidate_pairs_per_event * events, cfg.consolidate_max_epochs * n_edges)


class Consolidator:
    """Every node's levels and latent as a `gnaq` model with its own Adam state, for one idle period."""

    def __init__(self, cfg: LearnerConfig, graph: InteractionGraph, users: NodeTable, items: NodeTable,
                 rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        nu, ni = graph.n_users, graph.n_items
        self.adj = graph.normalized_adjacency()
        self.edge_users, self.edge_items = graph.edge_arrays()
        levels, codes, latent = (torch.cat(pair) for pair in zip(users.training_rows(np.arange(nu)),
                                                                 items.training_rows(np.arange(ni))))
        embedding = QuantizedEmbedding(levels, codes, latent,
                                       cfg.bits, METHODS["gnaq"], cfg.rau_alpha, cfg.rau_half_degree)
        self.model = Recommender(nu, ni, embedding, cfg.n_layers)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.consolidate_lr)
        self.sampler = NegativeSampler(graph.has_edges, ni, rng)

    def run(self, pairs: int, seconds: float) -> int:
        """Optimiser steps over `pairs` sampled training pairs in all, stopping early once `seconds` have
        passed (after at least one step); the pairs trained. The pairs are spread evenly over
        ceil(pairs / consolidate_batch) steps: every step costs a full-graph propagation, so a small
        remainder is not given one of its own."""
        cfg = self.cfg
        start, trained = time.perf_counter(), 0
        while trained < pairs and (trained == 0 or time.perf_counter() - start < seconds):
            left = pairs - trained
            batch = math.ceil(left / math.ceil(left / cfg.consolidate_batch))
            pick = self.rng.integers(0, len(self.edge_users), batch)
            users = self.edge_users[pick]
            negatives = self.sampler.sample(users, cfg.n_negatives)
            training_step(self.model, self.adj, self.optimizer, torch.from_numpy(users),
                          torch.from_numpy(self.edge_items[pick]), torch.from_numpy(negatives),
                          cfg.lambda_weight, cfg.reg)
            trained += batch
        return trained

    @torch.no_grad()
    def write_to(self, users: NodeTable, items: NodeTable) -> None:
        """The tables take the consolidated model (levels rounded to their stored dtype)."""
        nu, ni = self.model.n_users, self.model.n_items
        emb = self.model.embedding
        stored, latent = emb.stored_levels(self.cfg.level_dtype), emb.latent.detach()
        users.write(np.arange(nu), stored[:nu], emb.codes[:nu], latent[:nu])
        items.write(np.arange(ni), stored[nu:], emb.codes[nu:], latent[nu:])
