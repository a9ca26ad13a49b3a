import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from gnaq_stream.checkpoint import StoredModel, load_checkpoint, save_checkpoint
from gnaq_stream.config import LearnerConfig
from gnaq_stream.data.events import Event
from gnaq_stream.errors import CheckpointError, ConfigError
from gnaq_stream.model.lightgcn import propagate
from gnaq_stream.quant.packing import LevelRangeError
from gnaq_stream.quant.quantizer import init_from_embedding
from gnaq_stream.stream.learner import BACKGROUND_REFRESH_SECONDS, StreamLearner
from gnaq_stream.stream.prequential import ITEM_BLOCK, PASS_ROWS, PrequentialEvaluator, item_ranks

CFG = LearnerConfig(dim=8, bits=2, level_dtype="fp32", refine_steps=2, refine_budget_seconds=60.0,
                    prequential_sample=1.0)


def _checkpoint():
    torch.manual_seed(0)
    emb = torch.randn(5, 8)  # 2 users, 3 items
    return StoredModel(method="fp", n_users=2, n_items=3, dim=8, n_layers=2, embedding=emb,
                       edges=np.array([[0, 0], [0, 1], [1, 2]]))


def test_from_checkpoint_keeps_graph_and_quantizes_like_offline():
    ck = _checkpoint()
    learner = StreamLearner.from_checkpoint(ck, CFG)
    assert (learner.graph.n_users, learner.graph.n_items, learner.graph.n_edges) == (2, 3, 3)
    levels, codes = init_from_embedding(ck.embedding[:2], 2)
    got_levels, got_codes = learner.users.levels_codes(np.arange(2))
    assert torch.equal(got_codes, codes)
    torch.testing.assert_close(got_levels, levels)


@pytest.mark.parametrize("level_dtype,tolerance", [("fp32", 1e-6), ("fp8", 1 / 16)])
def test_a_tanh_checkpoint_streams_with_its_tanh(tmp_path, level_dtype, tolerance):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (5, 8), generator=gen, dtype=torch.uint8).numpy()
    levels = torch.linspace(-2.0, 2.0, 4).repeat(5, 1) * torch.rand(5, 1, generator=gen)  # where tanh bends
    save_checkpoint(StoredModel(method="gnaq-paper", n_users=2, n_items=3, dim=8, n_layers=2, bits=2,
                                level_dtype=level_dtype, activation="tanh", codes=codes, levels=levels,
                                edges=np.array([[0, 0], [0, 1], [1, 2]])), tmp_path)
    ck = load_checkpoint(tmp_path)
    learner = StreamLearner.from_checkpoint(ck, CFG)
    error = (torch.cat([learner.users.embeddings(), learner.items.embeddings()]) - ck.layer0()).abs().max()
    assert error <= tolerance * ck.layer0().abs().max()
    without_tanh = ck.levels.gather(1, torch.from_numpy(ck.codes).long())
    assert error < 0.1 * (without_tanh - ck.layer0()).abs().max()
    learner.refresh_final_embeddings(force=True)
    final = propagate(learner.graph.normalized_adjacency(), ck.layer0(), 2)
    # users' final rows = the refresh's context, held as int8 rows (error <= 1/254 of a row's largest
    # value), + their own share
    context = final - ck.layer0() / 3
    bound = context.abs().amax(1, keepdim=True) / 254 + tolerance * final.abs().max()
    assert ((learner.final_users - final[:2]).abs() <= bound[:2] * (1 + 1e-5)).all()
    assert (learner.final_items - final[2:]).abs().max() <= tolerance * final.abs().max()  # the propagation's own


def test_a_users_final_embedding_counts_its_new_edges_at_once():
    # one layer: items pass on their layer 0, so a user's final row after a new edge is exactly the
    # new graph's propagation (up to the int8 rows the items' sums are held in)
    ck = _checkpoint()
    learner = StreamLearner.from_checkpoint(ck, LearnerConfig(**{**CFG.__dict__, "refine_steps": 0}))
    learner.cfg = LearnerConfig(**{**learner.cfg.__dict__, "n_layers": 1})
    learner.refresh_final_embeddings(force=True)
    before = learner.current_final(np.array([1]), np.zeros(0, dtype=np.int64))[0]
    learner.apply_micro_batch([Event("1", "0", 1.0)])  # user 1 had only item 2
    assert learner.context_users == 2 and learner.graph.n_edges == 4  # no refresh since
    layer0 = torch.cat([learner.users.embeddings(), learner.items.embeddings()])
    final = propagate(learner.graph.normalized_adjacency(), layer0, 1)
    got = learner.current_final(np.array([0, 1]), np.zeros(0, dtype=np.int64))[0]
    assert (got - final[:2]).abs().max() <= layer0.abs().max() / 254
    assert (before - final[1]).abs().max() > 10 * layer0.abs().max() / 254  # the old neighbourhood gave another row
    _, aggregate = learner._context_rows(np.array([0, 1]), np.zeros(0, dtype=np.int64))
    adj = learner.graph.normalized_adjacency()
    torch.testing.assert_close(aggregate, torch.sparse.mm(adj, layer0)[:2])  # current rows, exact


def test_a_checkpoint_with_item_biases_is_refused_not_streamed_without_them():
    model = _checkpoint()
    model.method, model.item_bias = "gnaq-paper", torch.ones(3)
    with pytest.raises(CheckpointError, match="bias per item, which serving rows cannot carry"):
        StreamLearner.from_checkpoint(model, CFG)


def test_learner_rows_must_be_smaller_than_fp32():
    with pytest.raises(ConfigError, match="320 bytes per node at dim 64"):
        LearnerConfig(bits=8)
    with pytest.raises(ConfigError, match="576 bytes per node at dim 64"):
        LearnerConfig(level_dtype="fp16", serve_bits=8)
    assert LearnerConfig(dim=128, serve_bits=8).serve_bits == 8  # 128 + 256 bytes < 512
    model = StoredModel(method="gnaq", n_users=1, n_items=1, dim=64, n_layers=3, bits=8, level_dtype="fp8",
                        codes=np.zeros((2, 64), np.uint8), levels=torch.zeros(2, 256))
    with pytest.raises(ConfigError, match="not less than float32's 256"):
        StreamLearner.from_checkpoint(model, CFG)


def test_levels_refinement_pushes_beyond_fp8_stop_the_batch_with_an_error():
    cfg = LearnerConfig(**{**CFG.__dict__, "level_dtype": "fp8", "refine_lr": 1000.0})
    learner = StreamLearner.from_checkpoint(_checkpoint(), cfg)
    with pytest.raises(LevelRangeError, match="do not fit fp8"):
        learner.apply_micro_batch([Event("0", "2", 1.0)])


def test_new_user_embedding_is_mean_of_one_and_two_hop_neighbours():
    learner = StreamLearner.from_checkpoint(_checkpoint(), LearnerConfig(**{**CFG.__dict__, "refine_steps": 0}))
    result = learner.apply_micro_batch([Event("new", "2", 1.0)])
    assert result.new_users == ["new"] and result.new_items == []
    # 1-hop: item 2; 2-hop: users of item 2 = user 1 and the new user itself (not embedded yet)
    expected = torch.stack([learner.items.embeddings(np.array([2]))[0],
                            learner.users.embeddings(np.array([1]))[0]]).mean(0)
    latent = learner.users.training_rows(np.array([2]))[2][0]
    torch.testing.assert_close(latent, expected, atol=2e-3, rtol=2e-3)  # held as an int8 difference
    levels, codes = init_from_embedding(expected.unsqueeze(0), 2)
    assert torch.equal(learner.users.levels_codes(np.array([2]))[1][0], codes[0])


def test_node_without_embedded_neighbours_gets_the_prior():
    learner = StreamLearner(LearnerConfig(**{**CFG.__dict__, "refine_steps": 0}))
    result = learner.apply_micro_batch([Event("a", "b", 1.0)])
    assert result.new_users == ["a"] and result.new_items == ["b"]
    assert learner.users.n == 1 and learner.items.n == 1
    assert torch.isfinite(learner.users.embeddings()).all()


def test_refinement_changes_only_the_touched_nodes_and_versions_it():
    learner = StreamLearner.from_checkpoint(_checkpoint(), CFG)
    before_levels = learner.items.levels_codes(np.arange(3))[0]
    result = learner.apply_micro_batch([Event("0", "2", 1.0), Event("0", "2", 2.0)])
    assert result.refine_steps == 2 and result.refine_seconds > 0
    assert learner.graph.n_edges == 4 and learner.graph.n_events == 5
    assert result.event_users.tolist() == [0, 0] and result.event_items.tolist() == [2, 2]
    users, items, counts = learner.graph.edges()
    assert counts[(users == 0) & (items == 2)].tolist() == [2]
    assert 0 in result.changed_users.tolist() and 2 in result.changed_items.tolist()
    after_levels = learner.items.levels_codes(np.arange(3))[0]
    assert not torch.equal(after_levels[2], before_levels[2])
    assert learner.users.version[0] == result.version == 1
    for idx in range(3):
        if idx not in result.changed_items.tolist():
            assert torch.equal(after_levels[idx], before_levels[idx])


@pytest.mark.parametrize("level_dtype", ["fp32", "fp8"])
def test_exactly_the_rows_whose_stored_bytes_changed_are_reported(level_dtype):
    learner = StreamLearner.from_checkpoint(_checkpoint(), LearnerConfig(**{**CFG.__dict__, "level_dtype": level_dtype}))
    users, items = np.arange(learner.users.n), np.arange(learner.items.n)
    before = learner.users.packed(users), learner.items.packed(items)
    result = learner.apply_micro_batch([Event("0", "2", 1.0), Event("1", "0", 2.0)])
    after = learner.users.packed(users), learner.items.packed(items)
    assert result.changed_users.tolist() == np.flatnonzero((before[0] != after[0]).any(1)).tolist()
    assert result.changed_items.tolist() == np.flatnonzero((before[1] != after[1]).any(1)).tolist()


def test_refinement_raises_the_score_of_the_new_interaction():
    learner = StreamLearner.from_checkpoint(_checkpoint(), LearnerConfig(**{**CFG.__dict__, "refine_steps": 20,
                                                                               "refine_budget_seconds": 30.0,
                                                                               "refine_lr": 0.05}))
    learner.refresh_final_embeddings(force=True)
    before = (learner.final_users[1] @ learner.final_items.T).clone()
    learner.apply_micro_batch([Event("1", "0", 1.0)] * 4)
    learner.refresh_final_embeddings(force=True)
    after = learner.final_users[1] @ learner.final_items.T
    assert after[0] - after[1] > before[0] - before[1]


def _held_propagation(learner, monkeypatch):
    """Make the learner's next propagation wait at its adjacency until the returned event is set."""
    go, snapshot = threading.Event(), learner.graph.adjacency_blocks_snapshot

    def held():
        build = snapshot()
        return lambda: (go.wait(10), build())[1]
    monkeypatch.setattr(learner.graph, "adjacency_blocks_snapshot", held)
    return go


def test_a_slow_propagation_runs_in_the_background_from_the_state_at_its_start(monkeypatch):
    learner, twin = (StreamLearner.from_checkpoint(_checkpoint(), CFG) for _ in range(2))
    twin.refresh_final_embeddings(force=True)  # the same model, propagated at once
    learner.refresh_cost = 2 * BACKGROUND_REFRESH_SECONDS  # as if the last propagation had been slow
    go = _held_propagation(learner, monkeypatch)
    learner.refresh_final_embeddings()
    assert learner.final_version == -1  # started, not waited for
    result = learner.apply_micro_batch([Event("1", "0", 1.0), Event("new", "2", 1.0)])  # graph and rows change
    assert len(result.changed_users) and learner.final_version == -1
    go.set()
    learner.wait_refresh()
    assert learner.final_version == twin.final_version == 0  # as of the version it started at
    assert torch.equal(learner.final_items_t, twin.final_items_t)
    assert torch.equal(learner.context.values, twin.context.values) and learner.context_users == 2


def test_a_background_propagation_error_is_raised_on_the_loop(monkeypatch):
    learner = StreamLearner.from_checkpoint(_checkpoint(), CFG)
    learner.refresh_cost = 2 * BACKGROUND_REFRESH_SECONDS

    def broken():
        return lambda: torch.zeros(0) @ torch.zeros(3)  # shapes that cannot multiply
    monkeypatch.setattr(learner.graph, "adjacency_blocks_snapshot", broken)
    learner.refresh_final_embeddings()
    with pytest.raises(RuntimeError):
        learner.wait_refresh()
    assert learner.final_version == -1


_EXIT_DURING_A_PROPAGATION = """
import threading
import numpy as np, torch
from gnaq_stream.config import LearnerConfig
from gnaq_stream.graph.interaction_graph import InteractionGraph
from gnaq_stream.quant.node_table import NodeTable
from gnaq_stream.stream import learner as module
rng = np.random.default_rng(0)
cfg = LearnerConfig(dim=64, refine_steps=0)
graph = InteractionGraph()
graph.add_users([str(k) for k in range(200_000)])
graph.add_items([str(k) for k in range(50_000)])
graph.add_interactions(rng.integers(0, 200_000, 4_000_000), rng.integers(0, 50_000, 4_000_000))
tables = [NodeTable(64, cfg.bits, cfg.level_dtype) for _ in range(2)]
for table, n in zip(tables, (200_000, 50_000)):
    table.append(torch.randn(n, 64), 0)
learner = module.StreamLearner(cfg, graph, *tables)
inside, propagate_items = threading.Event(), module.propagate_items
module.propagate_items = lambda *args: (inside.set(), propagate_items(*args))[1]
learner.refresh_cost = 10.0  # as if slow: the next propagation runs in the background
learner.refresh_final_embeddings()
inside.wait(60)  # the exit comes while it multiplies
print(learner.refreshing, flush=True)
"""


def test_a_process_that_exits_during_a_background_propagation_exits_cleanly():
    done = subprocess.run([sys.executable, "-c", _EXIT_DURING_A_PROPAGATION], capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.strip() == "True"  # it exited while the propagation ran
    assert done.returncode == 0, done.stderr[-500:]


def test_prequential_scores_before_learning():
    learner = StreamLearner.from_checkpoint(_checkpoint(), CFG)
    pe = PrequentialEvaluator(window=100, sample=1.0)
    pe.score(learner, [Event("1", "0", 1.0), Event("ghost", "0", 1.0)])
    assert len(pe.ranks) == 2 and float("inf") in pe.ranks
    learner.refresh_final_embeddings(force=True)
    scores = learner.final_users[1] @ learner.final_items.T
    scores[2] = float("-inf")  # user 1 already has item 2: masked
    assert min(pe.ranks) == int((scores > scores[0]).sum())
    m = pe.metrics()
    assert m["recall@20"] == pytest.approx(0.5)
    assert 0 < m["ndcg@20"] <= 0.5


def test_a_large_catalogue_is_scored_in_passes_of_many_events():
    pe = PrequentialEvaluator(window=10, sample=0.02, seed=0, max_scores_per_event=1000)
    # 500k items: share 0.002, ~10 events of a 5,000-event batch, each batch a pass over every item
    picks = [pe.pick(5000, 500_000) for _ in range(10_000)]
    scored, passes = sum(map(len, picks)), sum(len(p) > 0 for p in picks)
    assert scored / (10_000 * 5000) == pytest.approx(0.002, rel=0.15)  # the same share in expectation
    assert scored / passes == pytest.approx(PASS_ROWS, rel=0.15)  # in ~13x fewer passes
    assert all(len(pe.pick(5000, 1000)) for _ in range(20))  # a small catalogue: every batch is scored


def test_item_ranks_match_a_masked_full_ranking():
    gen = torch.Generator().manual_seed(0)
    n_users, n_items, dim = 30, 3 * ITEM_BLOCK + 5, 8
    # small integers: every score is exact, so ties are real and both sides must treat them alike
    users = torch.randint(-3, 4, (n_users, dim), generator=gen).float()
    items = torch.randint(-3, 4, (n_items, dim), generator=gen).float()
    targets = torch.randint(0, n_items, (n_users,), generator=gen)
    rows = torch.randint(0, n_users, (400,), generator=gen)
    seen = torch.randint(0, n_items, (400,), generator=gen)
    seen[:5], rows[:5] = targets[:5], torch.arange(5)  # repeats: a user's history holds its target
    scores = users @ items.T
    target_scores = scores.gather(1, targets[:, None])
    scores[rows, seen] = float("-inf")
    scores.scatter_(1, targets[:, None], target_scores)
    expected = (scores > target_scores).sum(1)
    keep = seen != targets[rows]
    got = item_ranks(users, items.T.contiguous(), targets, rows[keep], seen[keep])
    assert got.tolist() == expected.tolist()


def _community_auc(learner: StreamLearner) -> float:
    """How often a user scores an item of its own community above one of the other (20 items each)."""
    learner.refresh_final_embeddings(force=True)
    users = torch.tensor([int(learner.graph.users.get(str(u))) for u in range(40)])
    items = torch.tensor([int(learner.graph.items.get(str(i))) for i in range(40)])
    scores = learner.final_users[users] @ learner.final_items[items].T
    own = (torch.arange(40)[:, None] // 20) == (torch.arange(40)[None, :] // 20)
    wins = [(scores[u][own[u]][:, None] > scores[u][~own[u]][None, :]).float().mean() for u in range(40)]
    return float(torch.stack(wins).mean())


def test_consolidation_trains_the_whole_graph_and_versions_the_rows_it_changed():
    rng = np.random.default_rng(0)
    cfg = LearnerConfig(dim=8, bits=2, level_dtype="fp8", refine_steps=0, consolidate_batch=256)
    learner = StreamLearner(cfg)
    # two communities: users 0-19 interact with items 0-19, users 20-39 with items 20-39
    events = [Event(str(u), str(20 * (u // 20) + int(i)), 0.0)
              for u in range(40) for i in rng.choice(20, 8, replace=False)]
    learner.apply_micro_batch(events)
    before = _community_auc(learner)
    version = learner.version
    rows = learner.users.packed(np.arange(40)), learner.items.packed(np.arange(40))
    result, trained = learner.consolidate(256 * 40, 60.0)
    assert trained == 256 * 40 and result.events == 0 and result.version == learner.version == version + 1
    # exactly the rows whose stored bytes changed are reported (and written), with the new version
    for table, old, changed in ((learner.users, rows[0], result.changed_users),
                                (learner.items, rows[1], result.changed_items)):
        differs = (table.packed(np.arange(40)) != old).any(1)
        assert changed.tolist() == np.flatnonzero(differs).tolist() and len(changed) > 0
        assert (table.version[changed] == learner.version).all()
        assert (table.version[np.flatnonzero(~differs)] == version).all()
    after = _community_auc(learner)
    assert after > max(before, 0.97), (before, after)
    consolidator = learner.consolidator
    learner.consolidate(256, 60.0)
    assert learner.consolidator is consolidator  # one optimiser across the slices of an idle period
    learner.apply_micro_batch([Event("0", "1", 1.0)])
    assert learner.consolidator is None


def test_consolidation_trains_exactly_the_pairs_it_is_given_in_even_steps():
    cfg = LearnerConfig(dim=8, bits=2, level_dtype="fp8", refine_steps=0, consolidate_batch=256)
    learner = StreamLearner(cfg)
    learner.apply_micro_batch([Event(str(u), str((u * 7 + k) % 30), 0.0) for u in range(30) for k in range(5)])

    def adam_steps():
        return {int(state["step"]) for state in learner.consolidator.optimizer.state.values()}

    assert learner.consolidate(600, 60.0)[1] == 600 and adam_steps() == {3}  # 3 steps of 200, not 256 + 256 + 88
    assert learner.consolidate(300, 60.0)[1] == 300 and adam_steps() == {5}  # 2 more of 150
    # past its time slice it stops early (after one step) and reports what it trained
    assert learner.consolidate(10 * 256, 0.0)[1] == 256


def _rows_dequantised(learner, events, monkeypatch):
    """Rows NodeTable.embeddings dequantises while the learner applies `events` (all rows for None)."""
    from gnaq_stream.quant.node_table import NodeTable

    counted = []
    real = NodeTable.embeddings

    def counting(table, idx=None):
        counted.append(table.n if idx is None else len(idx))
        return real(table, idx)

    monkeypatch.setattr(NodeTable, "embeddings", counting)
    learner.apply_micro_batch(events)
    monkeypatch.setattr(NodeTable, "embeddings", real)
    return sum(counted)


@pytest.mark.parametrize("attach", [False, True])
def test_new_nodes_cost_the_same_whatever_the_size_of_the_tables(monkeypatch, attach):
    """Cold start: a batch of only new users and items (or new users on existing items) dequantises
    the same rows whether the model holds 200 or 20,000 nodes (it once took the whole table's mean for
    every node without neighbours)."""
    cfg = LearnerConfig(dim=8, bits=2, refine_steps=0, prequential_sample=0.0)
    costs = []
    for size in (100, 10_000):
        learner = StreamLearner(cfg)
        learner.apply_micro_batch([Event(f"old{k}", f"item{k}", 0.0) for k in range(size)])
        learner.refresh_final_embeddings(force=True)
        fresh = [Event(f"new{k}", f"item{k % 50}" if attach else f"newitem{k}", 1.0) for k in range(500)]
        costs.append(_rows_dequantised(learner, fresh, monkeypatch))
        assert learner.users.n == size + 500
        assert torch.isfinite(learner.users.training_rows(np.arange(learner.users.n))[2]).all()
    assert costs[0] == costs[1] and costs[0] <= 500 * (1 + cfg.neighbour_samples) * 2


def test_a_node_without_neighbours_starts_near_the_running_mean_of_its_kind():
    learner = StreamLearner(LearnerConfig(dim=8, bits=2, refine_steps=0, prequential_sample=0.0))
    learner.apply_micro_batch([Event(f"u{k}", f"i{k}", 0.0) for k in range(300)])
    mean = learner.users.embeddings().mean(0)
    torch.testing.assert_close(learner.users.mean, learner.users.training_rows(np.arange(300))[2].mean(0))
    learner.apply_micro_batch([Event("alone", "new-item", 1.0)])
    latent = learner.users.training_rows(np.array([300]))[2][0]
    assert (latent - mean).abs().max() < 0.5  # the mean plus noise of scale 0.1


def _stored_rows_after_one_batch(tmp_path, name, refine_steps, monkeypatch=None):
    from gnaq_stream.store.embedding_store import EmbeddingStore

    rng = np.random.default_rng(0)
    # 100 users, 200 items; levels mostly beyond 1/8, where an fp8 spacing exceeds twice a step
    emb = torch.from_numpy(rng.normal(0, 2.0, (300, 16)).astype(np.float32))
    edges = np.stack([rng.integers(0, 100, 2000), rng.integers(0, 200, 2000)], axis=1)
    model = StoredModel(method="fp", n_users=100, n_items=200, dim=16, n_layers=2, embedding=emb, edges=edges)
    cfg = LearnerConfig(dim=16, bits=2, level_dtype="fp8", refine_steps=refine_steps, prequential_sample=0.0)
    learner = StreamLearner.from_checkpoint(model, cfg)
    with EmbeddingStore(tmp_path / name) as store:
        store.write(learner.initial_changes())
        for b in range(5):  # refinement steps accumulate over batches, or are rounded away each time
            batch = [Event(str(u), str(i), 1.0) for u, i in zip(rng.integers(0, 100, 400), rng.integers(0, 200, 400))]
            store.write(learner.changes(learner.apply_micro_batch(batch), {("t", 0): 400 * (b + 1)}))
        back = StreamLearner.from_state(store.load(cfg))
    return np.concatenate([back.users.packed(np.arange(100)), back.items.packed(np.arange(200))])


def test_refinement_changes_the_stored_rows_and_rounding_to_nearest_erased_most_of_it(tmp_path, monkeypatch):
    """Refinement's steps (~5e-3) are under half an fp8 spacing for most levels: stochastic rounding
    keeps them in expectation, so many more stored levels differ from the same batches unrefined
    than with rounding to nearest (what the learner did before). Checked on the stores."""
    from gnaq_stream.quant import packing
    from gnaq_stream.stream import learner as learner_module

    levels = slice(packing.code_bytes(16, 2), None)  # a row's level bytes (its codes change by RAU either way)
    unrefined = _stored_rows_after_one_batch(tmp_path, "none", 0)[:, levels]
    stochastic = (_stored_rows_after_one_batch(tmp_path, "stochastic", 1)[:, levels] != unrefined).mean()
    monkeypatch.setattr(learner_module, "round_levels", lambda levels, dtype, generator=None:
                        packing.round_levels(levels, dtype))
    nearest = (_stored_rows_after_one_batch(tmp_path, "nearest", 1)[:, levels] != unrefined).mean()
    # share of stored levels the refined batches moved: 22.5% vs 4.3% when written
    assert stochastic > 3 * nearest, (stochastic, nearest)
