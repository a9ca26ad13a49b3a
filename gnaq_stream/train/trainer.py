"""Offline training of every method (fp, gnaq, baselines, ablations) through one loop."""

from __future__ import annotations

import copy
import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from gnaq_stream.checkpoint import StoredModel
from gnaq_stream.config import TrainConfig
from gnaq_stream.data.datasets import InteractionData, Split, carve_validation
from gnaq_stream.errors import ConfigError
from gnaq_stream.graph.interaction_graph import edge_test, normalized_adjacency, unique_edges
from gnaq_stream.model.lightgcn import propagate, spectral_init
from gnaq_stream.model.gnaq import QuantizedEmbedding, Recommender, build_embedding, method_spec
from gnaq_stream.model.losses import bpr_loss, lambda_loss
from gnaq_stream.train.evaluation import evaluate_ranking, interaction_matrix


def tune_allocator() -> None:
    """Keep glibc from returning large buffers to the OS: otherwise every >32 MB temporary of a
    training step page-faults afresh (measured ~30% of a step on these CPUs)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_trim_threshold, 1 << 40)
    libc.mallopt(m_mmap_max, 0)


class NegativeSampler:
    """Uniform negatives, redrawn (up to 5 times) where they hit an edge of the same user; `is_edge`
    tells which (users, items) pairs are edges: `edge_test` offline, `InteractionGraph.has_edges` in
    the stream."""

    def __init__(self, is_edge: Callable[[np.ndarray, np.ndarray], np.ndarray], n_items: int,
                 rng: np.random.Generator):
        self.is_edge, self.n_items, self.rng = is_edge, n_items, rng

    def sample(self, users: np.ndarray, k: int) -> np.ndarray:
        neg = self.rng.integers(0, self.n_items, size=(len(users), k))
        flat, owner = neg.reshape(-1), np.repeat(users, k)
        check = np.arange(flat.size)  # later rounds re-check only the redrawn entries
        for _ in range(5):
            check = check[self.is_edge(owner[check], flat[check])]
            if not check.size:
                break
            flat[check] = self.rng.integers(0, self.n_items, size=check.size)
        return neg


def _rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] for an index of any shape; index_select (and its index_add backward) is several
    times faster than advanced indexing (and its index_put backward) on CPU."""
    return table.index_select(0, idx.reshape(-1)).reshape(*idx.shape, table.shape[1])


def ranking_loss(final: torch.Tensor, layer0: torch.Tensor, n_users: int, users: torch.Tensor,
                 pos: torch.Tensor, neg: torch.Tensor, lambda_weight: float, reg: float,
                 item_bias: torch.Tensor | None = None) -> torch.Tensor:
    """BPR + lambda * LambdaLoss on final embeddings (plus each item's bias, when the model has one),
    plus L2 on the batch's layer-0 rows."""
    u, p, n = _rows(final, users), _rows(final, n_users + pos), _rows(final, n_users + neg)
    pos_scores = (u * p).sum(-1)
    neg_scores = torch.einsum("bd,bkd->bk", u, n)
    if item_bias is not None:
        pos_scores = pos_scores + item_bias[pos]
        neg_scores = neg_scores + item_bias[neg]
    loss = bpr_loss(pos_scores, neg_scores)
    if lambda_weight > 0:
        loss = loss + lambda_weight * lambda_loss(pos_scores, neg_scores)
    return loss + l2_penalty(layer0, n_users, users, pos, neg, reg)


def l2_penalty(layer0: torch.Tensor, n_users: int, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
               reg: float) -> torch.Tensor:
    """reg/2 x the squared norm of the batch's layer-0 rows (user, positive, negatives), per example.
    Weighted by how often each row occurs in the batch, which equals gathering the rows but skips the
    gather's backward (several times slower on CPU than this pass over the table, which the step's
    full-graph propagation makes anyway)."""
    idx = torch.cat([users, n_users + pos, n_users + neg.reshape(-1)])
    counts = torch.bincount(idx, minlength=layer0.shape[0]).to(layer0.dtype)
    return reg * (counts * layer0.square().sum(1)).sum() / (2 * len(users))


def training_step(rec: Recommender, adj: torch.Tensor, opt: torch.optim.Optimizer, users: torch.Tensor,
                  pos: torch.Tensor, neg: torch.Tensor, lambda_weight: float, reg: float,
                  update_codes: bool = True) -> torch.Tensor:
    """One optimiser step on `ranking_loss` over the full graph, then (with `update_codes`) the codes
    re-derived by the method's rule; the step's loss. Offline training and consolidation share it."""
    layer0 = rec.embedding.layer0()
    final = propagate(adj, layer0, rec.n_layers)
    loss = ranking_loss(final, layer0, rec.n_users, users, pos, neg, lambda_weight, reg, rec.item_bias)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if update_codes:
        rec.embedding.update_codes(adj, rec.n_layers, final.detach())
    return loss


@dataclass
class TrainResult:
    model: StoredModel
    metrics: dict[str, float]
    train_seconds: float
    epochs_run: int
    best_epoch: int

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds / max(self.epochs_run, 1)


def export(rec: Recommender, method: str, cfg: TrainConfig, edges: np.ndarray | None = None) -> StoredModel:
    """The model as it will be stored: quantized methods keep only codes + levels in the level dtype."""
    emb = rec.embedding
    common = dict(method=method, n_users=rec.n_users, n_items=rec.n_items, dim=cfg.dim, n_layers=cfg.n_layers,
                  edges=edges, item_bias=None if rec.item_bias is None else rec.item_bias.detach().clone())
    if not isinstance(emb, QuantizedEmbedding):
        return StoredModel(**common, embedding=emb.layer0().detach().clone())
    emb.layer0()  # the STE rule refreshes codes from its latent here
    return StoredModel(**common, bits=cfg.bits, level_dtype=cfg.level_dtype,
                       activation="tanh" if emb.spec.tanh else "none",
                       codes=emb.codes.numpy().copy(), levels=emb.stored_levels(cfg.level_dtype))


def _known_before(data: InteractionData, split: str) -> Split:
    if split != "test" or data.valid is None:
        return data.train
    parts = (data.train, data.valid)
    return Split(np.concatenate([p.users for p in parts]), np.concatenate([p.items for p in parts]))


def evaluate_stored(model: StoredModel, data: InteractionData, split: str = "test", progress: bool = False,
                    adj: torch.Tensor | None = None) -> dict[str, float]:
    """Full-ranking metrics of a stored model on `split`. Everything known before `split` (train, and
    valid when scoring test) is the graph the model propagates over and is masked from the ranking.
    `adj` is that graph's normalised adjacency, built here when not given."""
    known = _known_before(data, split)
    if adj is None:
        adj = normalized_adjacency(data.n_users, data.n_items, known.users, known.items)
    with torch.no_grad():
        out = propagate(adj, model.layer0(), model.n_layers)
    users, items = out[:data.n_users], out[data.n_users:]
    if model.item_bias is not None:  # u.i + b_i as one more dimension: 1 on the user side, b_i on the item side
        users = torch.cat([users, torch.ones(len(users), 1)], 1)
        items = torch.cat([items, model.item_bias.unsqueeze(1)], 1)
    truth = interaction_matrix(data.n_users, data.n_items, getattr(data, split))
    exclude = interaction_matrix(data.n_users, data.n_items, known)
    return evaluate_ranking(users, items, truth, exclude, progress=progress)


def initial_table(data: InteractionData, cfg: TrainConfig) -> torch.Tensor:
    """Layer-0 embeddings a full-precision LightGCN starts from: `cfg.fp_init` "normal" is LightGCN's
    N(0, 0.1^2); "spectral" the graph's top singular vectors at the same mean row norm."""
    n_nodes = data.n_users + data.n_items
    if cfg.fp_init == "normal":
        return torch.randn(n_nodes, cfg.dim) * 0.1
    return spectral_init(data.n_users, data.n_items, data.train.users, data.train.items, cfg.dim, 0.1 * cfg.dim ** 0.5)


def train(data: InteractionData, cfg: TrainConfig, init: torch.Tensor | None = None,
          progress: bool = True) -> TrainResult:
    """Train `cfg.method` on the train split and early-stop on the validation split (carved from the
    train split when the dataset has none and `cfg.valid_share` > 0; otherwise the last epoch is kept).
    Metrics are the test split's, plus the validation split's as `valid_*`.

    Methods that continue a trained model start from `init` (float layer-0 embeddings); without it,
    a float model is trained first for the same epoch budget.
    """
    spec = method_spec(cfg.method)
    data = carve_validation(data, cfg.valid_share)
    tune_allocator()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n_nodes = data.n_users + data.n_items
    if init is not None and not spec.continues:
        raise ConfigError(f"{cfg.method} trains from scratch; to continue a checkpoint use fp-continued")
    if init is not None and tuple(init.shape) != (n_nodes, cfg.dim):
        raise ConfigError(f"initial embeddings have shape {tuple(init.shape)}, expected ({n_nodes}, {cfg.dim})")
    pre_seconds = 0.0
    if spec.continues and init is None:
        pre = train(data, TrainConfig(**{**cfg.__dict__, "method": "fp"}), progress=progress)
        init, pre_seconds = pre.model.layer0(), pre.train_seconds
    table = init if init is not None else initial_table(data, cfg)
    rec = Recommender(data.n_users, data.n_items, build_embedding(cfg.method, table, cfg.bits, cfg.rau_alpha,
                                                                  cfg.rau_half_degree, cfg.level_init),
                      cfg.n_layers, spec.item_bias)
    adj = normalized_adjacency(data.n_users, data.n_items, data.train.users, data.train.items)
    lr = cfg.qat_lr if spec.continues else cfg.lr
    groups = [{"params": [p for name, p in rec.named_parameters() if p.requires_grad and not name.endswith("levels")]},
              {"params": [p for name, p in rec.named_parameters() if p.requires_grad and name.endswith("levels")],
               "lr": cfg.level_lr or lr}]
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=lr)
    sampler = NegativeSampler(edge_test(data.train.users, data.train.items), data.n_items, rng)
    lambda_weight = cfg.lambda_weight if spec.lambda_loss else 0.0
    validate = data.valid is not None
    best_score, best_state, best_epoch, stale = -1.0, None, 0, 0
    n_train = len(data.train)
    seconds, epochs_run = 0.0, 0
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"train {cfg.method}", disable=not progress)
    for epoch in bar:
        start = time.perf_counter()
        order = rng.permutation(n_train)
        for step, lo in enumerate(range(0, n_train, cfg.batch_size)):
            idx = order[lo:lo + cfg.batch_size]
            users = data.train.users[idx]
            neg = sampler.sample(users, spec.negatives or cfg.n_negatives)
            loss = training_step(rec, adj, opt, torch.from_numpy(users), torch.from_numpy(data.train.items[idx]),
                                 torch.from_numpy(neg), lambda_weight, cfg.reg, (step + 1) % cfg.rau_every == 0)
        seconds += time.perf_counter() - start
        epochs_run = epoch
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if validate and epoch % cfg.eval_every == 0:
            score = evaluate_stored(export(rec, cfg.method, cfg), data, "valid", adj=adj)["recall@20"]
            if score > best_score:
                best_score, best_state, best_epoch, stale = score, copy.deepcopy(rec.state_dict()), epoch, 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    if best_state is not None:
        rec.load_state_dict(best_state)
    else:
        best_epoch = epochs_run
    # the stored graph is every interaction known before the test, validation included
    known = _known_before(data, "test")
    stored = export(rec, cfg.method, cfg, np.stack(unique_edges(known.users, known.items), 1))
    metrics = evaluate_stored(stored, data, "test", progress=progress)
    if validate:
        metrics |= {f"valid_{k}": v for k, v in evaluate_stored(stored, data, "valid", adj=adj).items()}
    return TrainResult(stored, metrics, seconds + pre_seconds, epochs_run, best_epoch)
