"""Each method's distinguishing switch, checked by what it does in training on a tiny graph: the
expectations are written out here, so changing a method's switch in METHODS (or ignoring it in the
model or trainer) fails its test."""

import numpy as np
import pytest
import torch

from gnaq_stream.checkpoint import StoredModel
from gnaq_stream.config import TrainConfig
from gnaq_stream.data.datasets import InteractionData, Split
from gnaq_stream.errors import ConfigError
from gnaq_stream.graph.interaction_graph import normalized_adjacency
from gnaq_stream.model.gnaq import METHODS, FullEmbedding, QuantizedEmbedding, Recommender, build_embedding
from gnaq_stream.model.lightgcn import propagate
from gnaq_stream.quant.quantizer import (dequantize, init_from_embedding, nearest_codes, neighbour_trust, rau_codes,
                                        rebin_codes)
from gnaq_stream.train import trainer
from gnaq_stream.train.trainer import export, train, training_step

N_USERS, N_ITEMS, DIM, BITS, LAYERS, ALPHA = 16, 24, 16, 2, 2, 0.25  # >= 20 items: metrics@20
CFG = dict(bits=BITS, dim=DIM, n_layers=LAYERS, epochs=1, batch_size=16, level_dtype="fp32", threads=1)


def _data() -> InteractionData:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(N_USERS), 4)
    items = rng.integers(0, N_ITEMS, len(users))
    return InteractionData("tiny", N_USERS, N_ITEMS, Split(users, items), Split(np.arange(N_USERS), items[::4]))


def _table() -> torch.Tensor:
    return torch.randn(N_USERS + N_ITEMS, DIM, generator=torch.Generator().manual_seed(0))


def _init(method: str) -> torch.Tensor | None:
    """The starting table of a method that continues a trained model; fp trains from scratch."""
    return _table() if METHODS[method].continues else None


def _stepped(method: str) -> tuple[Recommender, torch.Tensor]:
    """The method's model after two optimiser steps with their code updates and a third step whose
    codes are not yet re-derived (each test calls update_codes itself); and the adjacency."""
    data = _data()
    adj = normalized_adjacency(N_USERS, N_ITEMS, data.train.users, data.train.items)
    rec = Recommender(N_USERS, N_ITEMS, build_embedding(method, _table(), BITS, ALPHA, 0.0, "mean"), LAYERS)
    opt = torch.optim.Adam([p for p in rec.parameters() if p.requires_grad], lr=0.05)
    users, items = torch.from_numpy(data.train.users), torch.from_numpy(data.train.items)
    neg = torch.randint(0, N_ITEMS, (len(users), 2), generator=torch.Generator().manual_seed(1))
    for step in range(3):
        training_step(rec, adj, opt, users, items, neg, 1.0, 1e-4, update_codes=step < 2)
    return rec, adj


@pytest.mark.parametrize("method,frozen", [("gnaq", False), ("gnaq-paper", False), ("no-rau", False),
                                           ("no-lambda", False), ("no-dqs", True), ("ste", True)])
def test_levels_are_learned_unless_the_method_freezes_them(method, frozen):
    initial = build_embedding(method, _table(), BITS, ALPHA, 0.0, "mean").levels.detach()
    trained = train(_data(), TrainConfig(method=method, **CFG), init=_table(), progress=False).model.levels
    assert torch.equal(trained, initial) == frozen


@pytest.mark.parametrize("method,with_lambda", [("fp", False), ("fp-continued", True), ("gnaq", True),
                                                ("gnaq-paper", False), ("ste", True), ("no-rau", True),
                                                ("no-dqs", True), ("no-lambda", False)])
def test_lambda_loss_is_in_the_objective_unless_no_lambda(monkeypatch, method, with_lambda):
    calls, lambda_loss = [], trainer.lambda_loss

    def counted(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
        calls.append(len(pos_scores))
        return lambda_loss(pos_scores, neg_scores)

    monkeypatch.setattr(trainer, "lambda_loss", counted)
    train(_data(), TrainConfig(method=method, **CFG), init=_init(method), progress=False)
    assert bool(calls) == with_lambda


@pytest.mark.parametrize("method,negatives", [("fp", 8), ("gnaq-paper", 5), ("gnaq", 3), ("fp-continued", 3)])
def test_negatives_per_positive_are_the_methods_own_or_the_runs(monkeypatch, method, negatives):
    seen, sample = set(), trainer.NegativeSampler.sample

    def recorded(self, users: np.ndarray, k: int) -> np.ndarray:
        seen.add(k)
        return sample(self, users, k)

    monkeypatch.setattr(trainer.NegativeSampler, "sample", recorded)
    train(_data(), TrainConfig(method=method, n_negatives=3, **CFG), init=_init(method), progress=False)
    assert seen == {negatives}


@pytest.mark.parametrize("method", ["gnaq", "no-dqs", "no-lambda"])
def test_rau_codes_are_the_nearest_levels_of_the_latent_nudged_toward_the_neighbours(method):
    rec, adj = _stepped(method)
    emb = rec.embedding
    with torch.no_grad():
        aggregate = torch.sparse.mm(adj, emb.layer0())
        mix = neighbour_trust(adj.crow_indices().diff(), ALPHA, 0.0)
        expected = rau_codes(emb.latent, aggregate, emb.levels, mix)
    emb.update_codes(adj, LAYERS)
    assert torch.equal(emb.codes, expected)
    assert (emb.codes != nearest_codes(emb.latent.detach(), emb.levels.detach())).any()  # the neighbours count


def test_no_rau_codes_are_the_nearest_levels_of_the_latent_alone():
    rec, adj = _stepped("no-rau")
    emb = rec.embedding
    with torch.no_grad():
        mix = neighbour_trust(adj.crow_indices().diff(), ALPHA, 0.0)
        with_neighbours = rau_codes(emb.latent, torch.sparse.mm(adj, emb.layer0()), emb.levels, mix)
    emb.update_codes(adj, LAYERS)
    assert torch.equal(emb.codes, nearest_codes(emb.latent.detach(), emb.levels.detach()))
    assert (emb.codes != with_neighbours).any()  # RAU would have given other codes


def test_gnaq_paper_rebins_the_propagated_embedding_and_squashes_it_with_tanh():
    table = _table()
    emb = build_embedding("gnaq-paper", table, BITS, ALPHA, 0.0, "mean")
    lo, hi = table.min(1, keepdim=True).values, table.max(1, keepdim=True).values
    torch.testing.assert_close(emb.levels.detach(), lo + torch.arange(1, 5) * (hi - lo) / 5)  # m + k(M-m)/(2^n+1)
    rec, adj = _stepped("gnaq-paper")
    emb = rec.embedding
    assert emb.latent is None
    with torch.no_grad():
        layer0 = emb.layer0()
        torch.testing.assert_close(layer0, torch.tanh(dequantize(emb.levels, emb.codes)), rtol=0, atol=0)
        expected = rebin_codes(propagate(adj, layer0, LAYERS), BITS)
    assert (expected != rebin_codes(layer0, BITS)).any()  # propagation matters on this graph
    emb.update_codes(adj, LAYERS)
    assert torch.equal(emb.codes, expected)
    # in a training step, the re-binning reads the step's own forward propagation (before the update)
    opt = torch.optim.Adam([emb.levels], lr=0.05)
    data = _data()
    with torch.no_grad():
        forward = propagate(adj, emb.layer0(), LAYERS)
    training_step(rec, adj, opt, torch.from_numpy(data.train.users), torch.from_numpy(data.train.items),
                  torch.zeros(len(data.train), 1, dtype=torch.long), 0.0, 1e-4)
    assert torch.equal(emb.codes, rebin_codes(forward, BITS))
    with torch.no_grad():
        assert not torch.equal(emb.codes, rebin_codes(propagate(adj, emb.layer0(), LAYERS), BITS))
    stored = export(rec, "gnaq-paper", TrainConfig(method="gnaq-paper", **CFG))
    assert stored.activation == "tanh"
    torch.testing.assert_close(stored.layer0(), emb.layer0().detach())


def test_only_gnaq_paper_learns_an_item_bias_and_ranks_with_it():
    for method, spec in METHODS.items():
        assert spec.item_bias == (method == "gnaq-paper")
    result = train(_data(), TrainConfig(method="gnaq-paper", **CFG), init=_table(), progress=False)
    bias = result.model.item_bias
    assert bias is not None and bias.shape == (N_ITEMS,) and bias.abs().max() > 0
    assert trainer.evaluate_stored(result.model, _data()) == result.metrics
    data = _data()
    unseen = [min(set(range(N_ITEMS)) - set(data.train.items[data.train.users == u].tolist())) for u in range(N_USERS)]
    data = InteractionData("tiny", N_USERS, N_ITEMS, data.train, Split(np.arange(N_USERS), np.array(unseen)))
    boost = torch.zeros(N_ITEMS)
    boost[torch.tensor(unseen)] = 1e3  # every test item first: a ranking that reads the bias finds them
    without = trainer.evaluate_stored(StoredModel(**{**result.model.__dict__, "item_bias": None}), data)
    boosted = trainer.evaluate_stored(StoredModel(**{**result.model.__dict__, "item_bias": boost}), data)
    assert boosted["recall@10"] == 1.0 > without["recall@10"]
    assert result.model.size().bytes_model == (N_USERS + N_ITEMS) * (DIM * BITS // 8 + 4 * 4) + 4 * N_ITEMS
    assert train(_data(), TrainConfig(method="gnaq", **CFG), init=_table(), progress=False).model.item_bias is None


def test_ste_codes_follow_the_latent_on_a_static_grid():
    table = _table()
    rec, adj = _stepped("ste")
    emb = rec.embedding
    assert torch.equal(emb.levels.detach(), init_from_embedding(table, BITS)[0])
    assert not torch.equal(emb.latent.detach(), table)  # the latent is what learns
    before = emb.codes.clone()
    emb.update_codes(adj, LAYERS)
    assert torch.equal(emb.codes, before)  # no post-step rule: codes are taken at every forward
    with torch.no_grad():
        layer0 = emb.layer0()
    nearest = nearest_codes(emb.latent.detach(), emb.levels.detach())
    assert torch.equal(emb.codes, nearest)
    torch.testing.assert_close(layer0, dequantize(emb.levels.detach(), nearest), rtol=0, atol=0)


def test_fp_is_trained_and_stored_at_full_precision():
    rec, _ = _stepped("fp")
    assert isinstance(rec.embedding, FullEmbedding) and not isinstance(rec.embedding, QuantizedEmbedding)
    weight = rec.embedding.weight.detach()
    assert not torch.equal(weight, _table())
    assert min(len(row.unique()) for row in weight) > 1 << BITS  # no row is held on a grid of levels
    stored = export(rec, "fp", TrainConfig(method="fp", **CFG))
    assert stored.bits is None and stored.size().bytes_per_node == 4 * DIM
    assert torch.equal(stored.layer0(), weight)


def test_fp_continued_continues_the_checkpoint_at_full_precision_and_the_continuation_rate():
    cfg = TrainConfig(method="fp-continued", **CFG)
    result = train(_data(), cfg, init=_table(), progress=False)
    assert result.model.bits is None and result.model.size().bytes_per_node == 4 * DIM
    steps = -(-len(_data().train) // cfg.batch_size)
    moved = (result.model.layer0() - _table()).abs().max().item()
    # Adam moves a weight by about lr per step: qat_lr (1e-3) bounds it, fp's lr (1e-2) would not
    assert 0 < moved <= steps * cfg.qat_lr * 1.1 < cfg.lr


def test_fp_trains_from_scratch_and_refuses_a_checkpoint():
    with pytest.raises(ConfigError, match="fp trains from scratch; to continue a checkpoint use fp-continued"):
        train(_data(), TrainConfig(method="fp", **CFG), init=_table(), progress=False)


def test_a_quantized_method_whose_rows_are_not_smaller_than_fp32_is_refused():
    with pytest.raises(ConfigError, match="8 bits with fp8 levels take 320 bytes per node at dim 64"):
        TrainConfig(method="gnaq", bits=8)
    assert TrainConfig(method="gnaq", bits=8, dim=128).bits == 8  # 128 + 256 bytes < 512
    assert TrainConfig(method="fp", bits=8).bits == 8  # full precision stores no rows
    with pytest.raises(ConfigError, match="1 bits with fp32 levels take 9 bytes per node at dim 2"):
        TrainConfig(method="ste", bits=1, dim=2, level_dtype="fp32")


def test_every_method_has_its_mechanism_test():
    # a new method fails here until it gets a test of its own switch above
    assert set(METHODS) == {"fp", "fp-continued", "gnaq", "gnaq-paper", "ste", "no-rau", "no-dqs", "no-lambda"}
