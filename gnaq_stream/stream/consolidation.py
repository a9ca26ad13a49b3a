"""Consolidation: full-graph GNAQ training steps the learner takes while the stream is idle.

Refinement only nudges the nodes a micro-batch touches, against a context that is held fixed; on the
yelp2018 replay that recovered little of what a retrain from scratch learns from the same new
interactions (docs/benchmarks.md). Consolidation runs the offline `gnaq` step itself over the whole
current graph: Adam on levels and latent of every node, BPR + LambdaLoss on uniformly sampled edges
with uniform negatives, codes re-derived by RAU after every step. It spends an idle-time budget
earned by streaming (`consolidate_ratio` x the time spent on micro-batches), in slices short enough
that a message arriving meanwhile waits at most one slice. Its optimiser state lives until the next
micro-batch changes the graph.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from gnaq_stream.config import LearnerConfig
from gnaq_stream.graph.interaction_graph import InteractionGraph
from gnaq_stream.model.lightgcn import propagate
from gnaq_stream.quant.node_table import NodeTable
from gnaq_stream.quant.packing import round_levels
from gnaq_stream.quant.quantizer import dequantize, neighbour_trust, rau_codes
from gnaq_stream.train.trainer import ranking_loss


class Consolidator:
    """Float masters and Adam state of every node's levels and latent, for one idle period."""

    def __init__(self, cfg: LearnerConfig, graph: InteractionGraph, users: NodeTable, items: NodeTable,
                 rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        self.n_users, self.n_items = graph.n_users, graph.n_items
        self.adj = graph.normalized_adjacency()
        self.edge_users, self.edge_items = graph.edge_arrays()
        self.mix = neighbour_trust(self.adj.crow_indices().diff(), cfg.rau_alpha, cfg.rau_half_degree)
        nu, ni = self.n_users, self.n_items
        self.levels = torch.cat([users.levels[:nu], items.levels[:ni]]).requires_grad_()
        self.latent = torch.cat([users.latent[:nu], items.latent[:ni]]).requires_grad_()
        self.codes = torch.cat([users.codes[:nu], items.codes[:ni]])
        self.optimizer = torch.optim.Adam([self.levels, self.latent], lr=cfg.consolidate_lr)

    def run(self, seconds: float) -> int:
        """Optimiser steps until `seconds` have passed (at least one); the number taken."""
        cfg = self.cfg
        start, steps = time.perf_counter(), 0
        while steps == 0 or time.perf_counter() - start < seconds:
            pick = self.rng.integers(0, len(self.edge_users), cfg.consolidate_batch)
            users = torch.from_numpy(self.edge_users[pick])
            items = torch.from_numpy(self.edge_items[pick])
            negatives = torch.from_numpy(self.rng.integers(0, self.n_items, (len(pick), cfg.n_negatives)))
            layer0 = dequantize(self.levels, self.codes) + (self.latent - self.latent.detach())
            final = propagate(self.adj, layer0, cfg.n_layers)
            loss = ranking_loss(final, layer0, self.n_users, users, items, negatives, cfg.lambda_weight, cfg.reg)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():  # the offline gnaq rule: RAU codes after every step
                aggregate = torch.sparse.mm(self.adj, dequantize(self.levels, self.codes))
                self.codes = rau_codes(self.latent, aggregate, self.levels, self.mix)
            steps += 1
        return steps

    @torch.no_grad()
    def write_to(self, users: NodeTable, items: NodeTable) -> None:
        """The tables take the consolidated model (levels rounded to their stored dtype)."""
        nu, ni = self.n_users, self.n_items
        stored, latent = round_levels(self.levels, self.cfg.level_dtype), self.latent.detach()
        users.levels[:nu], items.levels[:ni] = stored[:nu], stored[nu:]
        users.latent[:nu], items.latent[:ni] = latent[:nu], latent[nu:]
        users.codes[:nu], items.codes[:ni] = self.codes[:nu], self.codes[nu:]
