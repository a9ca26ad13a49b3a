"""The streaming learner: applies micro-batches of events to the graph and the quantized model.

`apply_micro_batch` = add edges -> initialise new nodes from their neighbourhood -> a short RAU
refinement pass on the touched nodes (with `refine_steps` > 0; off by default, docs/architecture.md).
It uses the offline model's pieces unchanged: the same losses, quantizer initialisation and RAU
code rule, and the same propagation's items' side (`propagate_items`: users' last layer is never
needed here; tests/model/test_propagation.py holds it equal to the offline one).

Refinement scores the batch with the full graph's propagation as context: a node's final embedding
is `context + layer0 / (L + 1)`, the context being what its neighbourhood adds. At each refresh
(every `refresh_seconds` at most) the learner keeps, per item, its context, its 1-hop neighbour
aggregate and its sum of layers 0..L-1 (`item_inner`). Users hold none of these (they are most of
the nodes): a user's context is its items' `item_inner` rows weighted as in the normalised
adjacency, and its aggregate its items' layer-0 rows weighted the same way, both computed when
needed from the user's current edges (exactly the propagation's at the refresh, and fresher after:
a user's new items count at once). Measured on the yelp2018 replay, scoring with the propagation's
context ranked better than propagating over a sampled subgraph (whose truncated neighbourhoods
mis-scale every final embedding) and costs a fraction of it (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from gnaq_stream.checkpoint import StoredModel
from gnaq_stream.config import LearnerConfig
from gnaq_stream.data.events import Event
from gnaq_stream.errors import CheckpointError
from gnaq_stream.graph.interaction_graph import InteractionGraph
from gnaq_stream.model.lightgcn import propagate_items
from gnaq_stream.quant.int8_rows import Int8Rows
from gnaq_stream.quant.node_table import NodeTable
from gnaq_stream.quant.packing import round_levels
from gnaq_stream.quant.quantizer import dequantize, neighbour_trust, rau_codes
from gnaq_stream.store.embedding_store import ChangeSet, NodeRows, StoredState
from gnaq_stream.stream.consolidation import Consolidator
from gnaq_stream.train.trainer import NegativeSampler, ranking_loss


USER_CHUNK = 1 << 16  # users whose final embeddings are computed at a time (final_users)
# a full propagation that took longer than this runs next on a background thread: below it the loop's
# stall is short, and refreshes stay in step with the batches (deterministic, where tests need it)
BACKGROUND_REFRESH_SECONDS = 0.25

# glibc keeps the pages a propagation's transient arrays free (the peak is ~2.3x the steady RSS at
# 10M edges) unless told to give them back; other C libraries have no such call
_MALLOC_TRIM = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)


@dataclass
class _Propagation:
    """What a full propagation leaves (StreamLearner.refresh_final_embeddings), as of model `version`."""

    version: int
    n_users: int
    means: list[torch.Tensor | None]  # each kind's mean layer-0 row
    context: Int8Rows
    aggregate: Int8Rows
    item_inner: Int8Rows
    final_items_t: torch.Tensor
    seconds: float = 0.0


@dataclass
class BatchResult:
    """What one micro-batch (or consolidation slice) changed: everything the store must write for it."""

    version: int
    events: int
    new_users: list[str] = field(default_factory=list)
    new_items: list[str] = field(default_factory=list)
    event_users: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # per event, in order
    event_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    changed_users: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    changed_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    refine_seconds: float = 0.0
    refine_steps: int = 0


class StreamLearner:
    def __init__(self, cfg: LearnerConfig, graph: InteractionGraph | None = None,
                 users: NodeTable | None = None, items: NodeTable | None = None, version: int = 0,
                 model_id: str | None = None):
        self.cfg = cfg
        # names this model for its whole life (kept in the store): versions count within one model,
        # so a replica that sees another model id starts over instead of ignoring "older" versions
        self.model_id = model_id or uuid.uuid4().hex
        self.graph = graph or InteractionGraph()
        self.users = users or NodeTable(cfg.dim, cfg.bits, cfg.level_dtype)
        self.items = items or NodeTable(cfg.dim, cfg.bits, cfg.level_dtype)
        self.version = version
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.final_items_t = torch.zeros(cfg.dim, 0)  # items' final embeddings, column-wise for scoring
        # items', as of the last refresh (module docstring)
        self.context = Int8Rows(torch.zeros(0, cfg.dim))
        self.aggregate = Int8Rows(torch.zeros(0, cfg.dim))
        self.item_inner = Int8Rows(torch.zeros(0, cfg.dim))
        self.context_users = 0  # users at the last refresh
        self.refreshed_at = float("-inf")
        self.refresh_cost = 0.0  # seconds the last full propagation took
        self.publish_cost = 0.0  # seconds sending the last propagation's serving rows took (set by the publisher)
        self.refreshes = 0
        self.final_version = -1  # the model version the final embeddings were propagated at
        self._refresh: threading.Thread | None = None  # a background propagation, if one is running
        self._refresh_result: _Propagation | BaseException | None = None  # set by its thread
        self.consolidator: Consolidator | None = None
        self.consolidated_rows: tuple[np.ndarray, np.ndarray] | None = None  # packed after the last slice

    @classmethod
    def from_checkpoint(cls, model: StoredModel, cfg: LearnerConfig) -> "StreamLearner":
        """Start from an offline checkpoint: node k of each kind gets the external id str(k), and the
        checkpoint's training edges become the graph. A float checkpoint is quantized as GNAQ does.
        The learner has no activation, so a checkpoint's (gnaq-paper: tanh) is folded into its levels:
        tanh acts value by value, so tanh(levels)[codes] = tanh(levels[codes]), rounded to the level
        dtype like every stored level. Item biases have no place in a serving row: such a checkpoint
        is refused."""
        if model.item_bias is not None:
            raise CheckpointError(f"a {model.method} checkpoint scores with a bias per item, which serving rows "
                                  "cannot carry: it cannot be streamed")
        cfg = LearnerConfig(**{**cfg.__dict__, "dim": model.dim, "n_layers": model.n_layers,
                               **({"bits": model.bits, "level_dtype": model.level_dtype} if model.bits else {})})
        learner = cls(cfg)
        g = learner.graph
        g.add_users([str(k) for k in range(model.n_users)])
        g.add_items([str(k) for k in range(model.n_items)])
        if model.edges is not None:
            g.add_interactions(model.edges[:, 0], model.edges[:, 1])
        if model.bits is None:
            emb = model.layer0()
            learner.users.append(emb[:model.n_users], 0)
            learner.items.append(emb[model.n_users:], 0)
        else:
            nu = model.n_users
            levels = round_levels(torch.tanh(model.levels), model.level_dtype) if model.activation == "tanh" \
                else model.levels
            learner.users.load(model.codes[:nu], levels[:nu], np.zeros(nu, dtype=np.int64))
            learner.items.load(model.codes[nu:], levels[nu:], np.zeros(model.n_items, dtype=np.int64))
        return learner

    @classmethod
    def from_state(cls, state: StoredState) -> "StreamLearner":
        """Resume from what a store holds (EmbeddingStore.load)."""
        return cls(state.cfg, state.graph, state.users, state.items, state.version, state.model_id)

    # ---- what the store writes ------------------------------------------------------------------

    def changes(self, result: BatchResult, offsets: dict[tuple[str, int], int]) -> ChangeSet:
        """The store's change set for one applied batch (or consolidation slice) and its offsets."""
        g, cfg = self.graph, self.cfg
        rows = [NodeRows(idx, table.version[idx], table.packed(idx))
                for table, idx in ((self.users, result.changed_users), (self.items, result.changed_items))]
        return ChangeSet(
            state={"version": self.version, "n_users": g.n_users, "n_items": g.n_items, "n_edges": g.n_edges,
                   "n_events": g.n_events},
            model={"model_id": self.model_id, "dim": cfg.dim, "bits": cfg.bits, "level_dtype": cfg.level_dtype,
                   "n_layers": cfg.n_layers},
            new_users=result.new_users, first_user=g.n_users - len(result.new_users),
            new_items=result.new_items, first_item=g.n_items - len(result.new_items),
            users=rows[0], items=rows[1],
            events=np.stack([result.event_users, result.event_items], axis=1).astype(np.uint32), offsets=offsets)

    def initial_changes(self) -> ChangeSet:
        """The whole current state as one change set: a freshly started learner (e.g. from a checkpoint)."""
        g = self.graph
        users, items, counts = g.edges()
        result = BatchResult(self.version, 0, new_users=list(g.users.external), new_items=list(g.items.external),
                             event_users=np.repeat(users, counts), event_items=np.repeat(items, counts),
                             changed_users=np.arange(g.n_users), changed_items=np.arange(g.n_items))
        return self.changes(result, {})

    # ---- evaluation support -------------------------------------------------------------------

    def refresh_final_embeddings(self, force: bool = False) -> None:
        """Full LightGCN propagation of the whole graph, at most every `refresh_seconds`, and less
        often when it is slow: it and the publication of its rows take at most `refresh_max_share` of
        the wall time, so their cost per event stays bounded as the graph grows (the context and the
        served rows age instead). One that took over BACKGROUND_REFRESH_SECONDS runs next on a
        background thread from the graph and rows as of its start, while micro-batches go on; its
        result is taken up by the first call after it finished. `force`: one as of now, waited for."""
        if self._refresh is not None and (force or not self._refresh.is_alive()):
            self._take_refresh()
            if force and self.final_version == self.version:
                return  # it was as of now
        if self._refresh is not None:
            return
        period = max(self.cfg.refresh_seconds, (self.refresh_cost + self.publish_cost) / self.cfg.refresh_max_share)
        if not force and time.monotonic() - self.refreshed_at < period:
            return
        # on this thread: what the propagation reads, as of now (fast copies of compact arrays)
        inputs = (self.version, self.users.embeddings_snapshot(), self.items.embeddings_snapshot(),
                  self.graph.adjacency_blocks_snapshot())
        if force or self.refresh_cost <= BACKGROUND_REFRESH_SECONDS:
            self._install(self._propagate(*inputs))
            return
        self._refresh_result = None
        # not a daemon: the interpreter joins it at exit; a daemon thread still inside torch when the
        # process exits aborts it ("terminate called without an active exception", exit code 134)
        self._refresh = threading.Thread(target=self._propagate_in_background, args=inputs, name="propagation")
        self._refresh.start()

    def _propagate_in_background(self, *inputs) -> None:
        try:
            self._refresh_result = self._propagate(*inputs)
        except BaseException as exc:  # raised on the loop's thread when taken up
            self._refresh_result = exc

    def _take_refresh(self) -> None:
        """Wait for the background propagation and install its result (raise its error)."""
        self._refresh.join()
        result, self._refresh, self._refresh_result = self._refresh_result, None, None
        if isinstance(result, BaseException):
            raise result
        self._install(result)

    @property
    def refreshing(self) -> bool:
        """A background propagation is running (its transient arrays are held)."""
        return self._refresh is not None and self._refresh.is_alive()

    def wait_refresh(self) -> None:
        """Take up the background propagation, if one is running (e.g. before measuring something else)."""
        if self._refresh is not None:
            self._take_refresh()

    @torch.no_grad()
    def _propagate(self, version: int, user_rows: Callable[[], torch.Tensor], item_rows: Callable[[], torch.Tensor],
                   blocks: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> _Propagation:
        """The propagation from snapshots of the tables and the graph; reads nothing else of the learner."""
        start = time.monotonic()
        users0, items0 = user_rows(), item_rows()
        means = [rows.mean(0) if len(rows) else None for rows in (users0, items0)]
        final, aggregate, last = propagate_items(*blocks(), users0, items0, self.cfg.n_layers)
        scale = self.cfg.n_layers + 1
        # refinement's fixed inputs, items only, as int8 rows (docs/benchmarks.md, "Refinement that
        # changes the stored model")
        result = _Propagation(version, len(users0), means, context=Int8Rows(final - items0 / scale),
                              aggregate=Int8Rows(aggregate), item_inner=Int8Rows(final * scale - last),
                              final_items_t=final.T.contiguous())
        del final, aggregate, last, users0, items0  # freed before the trim below
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)
        result.seconds = time.monotonic() - start
        return result

    def _install(self, p: _Propagation) -> None:
        for table, mean in zip((self.users, self.items), p.means):
            if mean is not None:
                table.mean = mean
        self.context, self.aggregate, self.item_inner = p.context, p.aggregate, p.item_inner
        self.context_users, self.final_items_t = p.n_users, p.final_items_t
        self.refreshed_at = time.monotonic()
        self.refresh_cost = p.seconds
        self.refreshes += 1
        self.final_version = p.version

    # ---- the micro-batch ------------------------------------------------------------------------

    def apply_micro_batch(self, events: list[Event]) -> BatchResult:
        """Add the events' edges, initialise new nodes, refine the touched nodes."""
        self.consolidator = None  # its graph and optimiser state end here
        self.consolidated_rows = None
        if self.cfg.refine_steps > 0:
            # refinement's context, at most `refresh_seconds` old; taken before this batch so that the
            # final embeddings keep meaning "the model as of final_version"
            self.refresh_final_embeddings()
        self.version += 1
        g = self.graph
        result = BatchResult(self.version, len(events))
        n_users0, n_items0 = g.n_users, g.n_items
        users, items = g.add_users([ev.user for ev in events]), g.add_items([ev.item for ev in events])
        g.add_interactions(users, items)
        result.event_users, result.event_items = users, items
        result.new_users = g.users.external[n_users0:]
        result.new_items = g.items.external[n_items0:]
        self._init_new_nodes(n_users0, n_items0, users, items)
        if len(events) and self.cfg.refine_steps > 0:
            start = time.perf_counter()
            if len(events) > self.cfg.refine_max_events:  # bounded work per batch, whatever its size
                pick = self.rng.choice(len(events), self.cfg.refine_max_events, replace=False)
                users, items = users[pick], items[pick]
            result.changed_users, result.changed_items, result.refine_steps = self._refine(users, items)
            result.refine_seconds = time.perf_counter() - start
        changed_u = np.union1d(result.changed_users, np.arange(n_users0, g.n_users))
        changed_i = np.union1d(result.changed_items, np.arange(n_items0, g.n_items))
        result.changed_users, result.changed_items = changed_u, changed_i
        self.users.version[changed_u] = self.version
        self.items.version[changed_i] = self.version
        return result

    def consolidate(self, pairs: int, seconds: float) -> tuple[BatchResult, int]:
        """Full-graph training steps over `pairs` training pairs, cut short after about `seconds`
        (stream.consolidation): the nodes whose stored rows changed, and the pairs trained. Successive
        calls continue one optimiser until the next micro-batch."""
        if self.consolidator is None:
            self.consolidator = Consolidator(self.cfg, self.graph, self.users, self.items, self.rng)
        trained = self.consolidator.run(pairs, seconds)
        g = self.graph
        every = (np.arange(g.n_users), np.arange(g.n_items))
        # the rows as stored: copied once per idle period, then carried from slice to slice (only
        # consolidation changes the tables until the next micro-batch ends the period)
        before = self.consolidated_rows or (self.users.packed(every[0]), self.items.packed(every[1]))
        self.consolidator.write_to(self.users, self.items)
        self.version += 1
        after = self.users.packed(every[0]), self.items.packed(every[1])
        self.consolidated_rows = after
        # most rows' stored bytes survive a slice unchanged: only the others are versioned and written
        changed = [np.flatnonzero((new != old).any(1)) for new, old in zip(after, before)]
        self.users.version[changed[0]] = self.version
        self.items.version[changed[1]] = self.version
        return BatchResult(self.version, 0, changed_users=changed[0], changed_items=changed[1]), trained

    def _init_new_nodes(self, n_users0: int, n_items0: int, users: np.ndarray, items: np.ndarray) -> None:
        """Embedding of a new node = mean of its embedded neighbours (at most `neighbour_samples`; a
        node new in this batch has only this batch's edges) and of up to `neighbour_samples` of each
        one's own neighbours, then GNAQ init; a node with none gets its kind's mean plus noise. One
        vectorised pass per kind, so a node costs the same however large the tables are. Users come
        first, so new items see the new users."""
        g, cap = self.graph, self.cfg.neighbour_samples
        kinds = ((self.users, n_users0, users, self.items, items, g.users_of_items),
                 (self.items, n_items0, items, self.users, users, g.items_of_users))
        for table, first, own, other, their, second_hop in kinds:
            n_new = len(g.users if table is self.users else g.items) - first
            if n_new == 0:
                continue
            keep = (own >= first) & (their < other.n)
            pairs = np.unique((own[keep] - first) << 32 | their[keep])
            owner, one = pairs >> 32, pairs & 0xFFFFFFFF
            owner, one = self._at_most(owner, one, cap)
            at, two = second_hop(one, cap)
            embedded = two < table.n
            at, two = owner[at[embedded]], two[embedded]
            total = torch.zeros(n_new, self.cfg.dim)
            total.index_add_(0, torch.from_numpy(owner), other.embeddings(one))
            total.index_add_(0, torch.from_numpy(at), table.embeddings(two))
            count = torch.from_numpy(np.bincount(owner, minlength=n_new) + np.bincount(at, minlength=n_new))
            fresh = total / count.clamp(min=1).unsqueeze(1)
            alone = torch.from_numpy(np.flatnonzero(count.numpy() == 0))
            if len(alone):  # the prior: the kind's running mean (NodeTable.mean) plus small noise
                fresh[alone] = table.mean + 0.1 * torch.randn(len(alone), self.cfg.dim, generator=self.gen)
            table.append(fresh, self.version)

    def _at_most(self, owner: np.ndarray, values: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
        """A random `cap` of each owner's values (owner sorted); all where it has no more."""
        if not len(owner) or np.bincount(owner).max() <= cap:
            return owner, values
        order = self.rng.permutation(len(owner))
        order = order[np.argsort(owner[order], kind="stable")]
        owner, values = owner[order], values[order]
        keep = np.arange(len(owner)) - np.searchsorted(owner, owner) < cap
        return owner[keep], values[keep]

    @property
    def final_items(self) -> torch.Tensor:
        """Final embeddings of the items, as of the last refresh (a view of the scoring layout)."""
        return self.final_items_t.T

    @property
    def final_users(self) -> torch.Tensor:
        """Final embeddings of the users known at the last refresh, computed now from their current
        edges and layer-0 rows (held per user, it would be the learner's largest array)."""
        out = torch.empty(self.context_users, self.cfg.dim)
        item_rows = self._item_rows(np.arange(self.items.n))
        for start in range(0, self.context_users, USER_CHUNK):  # bounded temporaries: a chunk's edges
            users = np.arange(start, min(start + USER_CHUNK, self.context_users))
            out[start:start + len(users)] = self.current_final(users, np.zeros(0, dtype=np.int64), item_rows)[0]
        return out

    @torch.no_grad()
    def current_final(self, users: np.ndarray, items: np.ndarray,
                      item_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final embeddings of these nodes as of now, without a full propagation: their context plus
        their current layer-0 share (an item added since the last refresh is its own
        neighbourhood-initialised embedding). What refinement trains on, and what a micro-batch
        publishes for the nodes it touched. `item_rows`: every item's `item_inner` and layer-0 rows side
        by side, when the caller has them."""
        own = torch.cat([self.users.embeddings(users), self.items.embeddings(items)])
        context, _ = self._context_rows(users, items, item_rows)
        final = context + own / (self.cfg.n_layers + 1)
        return final[:len(users)], final[len(users):]

    def _context_rows(self, local_u: np.ndarray, local_i: np.ndarray,
                      item_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, neighbour aggregate) rows of these users then items: users' from their edges,
        items' as of the last refresh (an item added since stands in for its own: it was initialised
        from its neighbourhood)."""
        user_context, user_aggregate = self._user_context(local_u, item_rows)
        context, aggregate = torch.empty(len(local_i), self.cfg.dim), torch.empty(len(local_i), self.cfg.dim)
        known = local_i < len(self.context)
        at, pos = torch.from_numpy(local_i[known]), torch.from_numpy(np.flatnonzero(known))
        context.index_copy_(0, pos, self.context.rows(at))
        aggregate.index_copy_(0, pos, self.aggregate.rows(at))
        if not known.all():
            own, pos = self.items.embeddings(local_i[~known]), torch.from_numpy(np.flatnonzero(~known))
            context.index_copy_(0, pos, own * (self.cfg.n_layers / (self.cfg.n_layers + 1)))
            aggregate.index_copy_(0, pos, own)
        return torch.cat([user_context, context]), torch.cat([user_aggregate, aggregate])

    def _item_rows(self, items: np.ndarray) -> torch.Tensor:
        """These items' `item_inner` and layer-0 rows side by side: what they pass on to their users'
        context and aggregate. An item added since the last refresh passes on its own row L times (its
        layers 1..L-1 are not known yet)."""
        layer0 = self.items.embeddings(items)
        inner = layer0 * self.cfg.n_layers
        known = items < len(self.item_inner)
        inner[torch.from_numpy(known)] = self.item_inner.rows(torch.from_numpy(items[known]))
        return torch.cat([inner, layer0], 1)

    def _user_context(self, users: np.ndarray, item_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Context and 1-hop aggregate of these users from all their current edges: each item's
        `item_inner` resp. layer-0 row (`_item_rows`) weighted by 1 / sqrt(user degree * item degree),
        the context over L + 1."""
        g, dim = self.graph, self.cfg.dim
        owner, neighbours = g.items_of_users(users)
        if item_rows is None:  # each distinct item's rows once (the batch's users share popular items)
            distinct, slot = np.unique(neighbours, return_inverse=True)
            item_rows = self._item_rows(distinct)
        else:
            slot = neighbours
        weight = torch.from_numpy(1.0 / np.sqrt(g.user_degrees(users)[owner] * g.item_degrees(neighbours))).float()
        # the users' rows of the normalised adjacency (owner is grouped by user): one sparse product
        # sums both kinds of rows, faster than gathering them per edge
        row_starts = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(np.bincount(owner, minlength=len(users)), out=row_starts[1:])
        adj = torch.sparse_csr_tensor(torch.from_numpy(row_starts), torch.from_numpy(slot.astype(np.int64)), weight,
                                      size=(len(users), len(item_rows)))
        both = torch.sparse.mm(adj, item_rows)
        return both[:, :dim] / (self.cfg.n_layers + 1), both[:, dim:]

    def _refine(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """A few optimiser steps on BPR + LambdaLoss over the batch's interactions, levels and latent
        of the touched nodes (users, items, sampled negatives) updated by gradient, then their codes
        re-derived by RAU; bounded by `refine_budget_seconds`. Returns the users and items whose
        stored row (levels, codes) changed, and the steps taken."""
        cfg, g = self.cfg, self.graph
        start = time.perf_counter()
        negatives = NegativeSampler(g.has_edges, g.n_items, self.rng).sample(users, cfg.n_negatives)
        local_u = np.unique(users)
        local_i = np.unique(np.concatenate([items, negatives.ravel()]))
        n_u = len(local_u)
        context, aggregate = self._context_rows(local_u, local_i)
        levels, codes, latent = (torch.cat(pair) for pair in zip(self.users.training_rows(local_u),
                                                                 self.items.training_rows(local_i)))
        levels_before = levels.clone()
        levels.requires_grad_()
        latent.requires_grad_()
        batch_u = torch.from_numpy(np.searchsorted(local_u, users))
        batch_i = torch.from_numpy(np.searchsorted(local_i, items))
        batch_n = torch.from_numpy(np.searchsorted(local_i, negatives))
        steps = 0
        while steps < cfg.refine_steps and (steps == 0 or time.perf_counter() - start < cfg.refine_budget_seconds):
            layer0 = dequantize(levels, codes) + (latent - latent.detach())
            final = context + layer0 / (cfg.n_layers + 1)
            loss = ranking_loss(final, layer0, n_u, batch_u, batch_i, batch_n, cfg.lambda_weight, cfg.reg)
            levels.grad = latent.grad = None
            loss.backward()
            with torch.no_grad():
                # a fresh Adam's first step is lr * sign(g): take it directly, without building an
                # optimiser per micro-batch (that cost more than the step itself)
                for p in (levels, latent):
                    p -= cfg.refine_lr * p.grad.sign()
            steps += 1
        with torch.no_grad():
            # stochastic: a step is ~1e-3, under half an fp8 spacing for |level| >= 1/8, and rounding
            # to nearest erased it (0% of codes changed on ml-100k); unbiased rounding keeps it in expectation
            stored_levels = round_levels(levels, cfg.level_dtype, self.gen)
            degree = torch.from_numpy(np.concatenate([g.user_degrees(local_u), g.item_degrees(local_i)]))
            mix = neighbour_trust(degree, cfg.rau_alpha, cfg.rau_half_degree)
            new_codes = rau_codes(latent, aggregate, stored_levels, mix)
            for table, rows, sl in ((self.users, local_u, slice(0, n_u)), (self.items, local_i, slice(n_u, None))):
                table.write(rows, stored_levels[sl], new_codes[sl], latent.detach()[sl])
            # most steps move levels by less than the storage dtype resolves and leave the codes: only
            # rows whose stored bytes changed are reported (~1 in 5 on gowalla), so only they are written
            stored = ((stored_levels != levels_before).any(1) | (new_codes != codes).any(1)).numpy()
        return local_u[stored[:n_u]], local_i[stored[n_u:]], steps
