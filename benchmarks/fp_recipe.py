"""How fast full-precision LightGCN converges on this CPU, recipe by recipe, on validation only.

Trains LightGCN (dim 64, 3 layers, Adam, L2 `--reg` 1e-4 on the batch's layer-0 rows) on the train split
minus a carved validation split (10% of each user's training interactions, seed 0) for a fixed
wall-clock budget, and prints validation Recall@20 / NDCG@20 every few epochs. The variants differ
in one thing at a time: initialisation (N(0, 0.1^2) or spectral), sampling (every training
interaction once per epoch, or users uniformly as LightGCN's reference code does), the number of
negatives BPR averages over, or a sampled-softmax loss (per-row negatives, or one set of uniform
negatives shared by the batch, on dot products or cosine similarities). The test split is never read.

    python benchmarks/fp_recipe.py --dataset gowalla --minutes 8 --init spectral --negatives 8
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from gnaq_stream.config import TrainConfig
from gnaq_stream.data.datasets import carve_validation, load_dataset
from gnaq_stream.graph.interaction_graph import edge_test, normalized_adjacency
from gnaq_stream.model.lightgcn import propagate
from gnaq_stream.train.evaluation import evaluate_ranking, interaction_matrix
from gnaq_stream.train.trainer import NegativeSampler, initial_table, l2_penalty, ranking_loss, tune_allocator


def softmax_loss(final: torch.Tensor, layer0: torch.Tensor, n_users: int, users: torch.Tensor, pos: torch.Tensor,
                 neg: torch.Tensor, reg: float) -> torch.Tensor:
    """Sampled softmax over the positive and the row's negatives (dot products), plus the same L2."""
    u, p, n = final[users], final[n_users + pos], final[n_users + neg]
    logits = torch.cat([(u * p).sum(1, keepdim=True), torch.einsum("bd,bkd->bk", u, n)], 1)
    return -torch.log_softmax(logits, 1)[:, 0].mean() + l2_penalty(layer0, n_users, users, pos, neg, reg)


def shared_softmax_loss(final: torch.Tensor, layer0: torch.Tensor, n_users: int, users: torch.Tensor,
                        pos: torch.Tensor, shared: torch.Tensor, n_items: int, tau: float, reg: float,
                        cosine: bool) -> torch.Tensor:
    """Sampled softmax of each positive against one set of uniform negatives shared by the whole batch
    (one B x K matrix product instead of B x K gathered rows), the negatives' logits corrected by
    log(n_items / K) so it estimates the softmax over all items; L2 on users and positives."""
    u, p, n = final[users], final[n_users + pos], final[n_users + shared]
    if cosine:
        u, p, n = (torch.nn.functional.normalize(x, dim=1) for x in (u, p, n))
    pos_logits = (u * p).sum(1, keepdim=True) / tau
    neg_logits = u @ n.T / tau + float(np.log(n_items / len(shared)))
    logits = torch.cat([pos_logits, neg_logits], 1)
    return -torch.log_softmax(logits, 1)[:, 0].mean() + l2_penalty(layer0, n_users, users, pos, shared[:0], reg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--data-dir")
    p.add_argument("--minutes", type=float, default=8.0, help="training wall-clock budget (evaluation excluded)")
    p.add_argument("--init", choices=["normal", "spectral"], default="normal")
    p.add_argument("--sampling", choices=["interactions", "users"], default="interactions")
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--loss", choices=["bpr", "softmax", "shared-softmax"], default="bpr")
    p.add_argument("--tau", type=float, default=1.0, help="shared-softmax temperature")
    p.add_argument("--cosine", action="store_true", help="shared-softmax on cosine similarities (validated as such)")
    p.add_argument("--batch-size", type=int, default=32768)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine: the learning rate falls from --lr to 0 over --epochs, step by step")
    p.add_argument("--epochs", type=int, default=0, help="stop after this many epochs too (0: the minutes alone)")
    p.add_argument("--reg", type=float, default=1e-4, help="L2 on the batch's layer-0 rows")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    tune_allocator()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = carve_validation(load_dataset(args.dataset, args.data_dir), 0.1)
    n_users, n_items, tr = data.n_users, data.n_items, data.train
    adj = normalized_adjacency(n_users, n_items, tr.users, tr.items)
    truth = interaction_matrix(n_users, n_items, data.valid)
    known = interaction_matrix(n_users, n_items, tr)
    start = time.perf_counter()
    weight = torch.nn.Parameter(initial_table(data, TrainConfig(method="fp", fp_init=args.init)))
    init_seconds = time.perf_counter() - start
    opt = torch.optim.Adam([weight], lr=args.lr)
    steps_per_epoch = -(-len(tr) // args.batch_size)
    horizon = args.epochs * steps_per_epoch
    if args.schedule == "cosine" and not horizon:
        p.error("--schedule cosine needs --epochs (its horizon)")
    sampler = NegativeSampler(edge_test(tr.users, tr.items), n_items, rng)
    by_user = np.argsort(tr.users, kind="stable")
    starts = np.searchsorted(tr.users[by_user], np.arange(n_users + 1))
    active = np.flatnonzero(np.diff(starts) > 0)

    def validate(seconds: float, epoch: int) -> tuple:
        with torch.no_grad():
            out = propagate(adj, weight, 3)
        items = torch.nn.functional.normalize(out[n_users:], dim=1) if args.cosine else out[n_users:]
        m = evaluate_ranking(out[:n_users], items, truth, known)
        print(f"{seconds:7.1f} s  epoch {epoch:4d}  valid R@20 {m['recall@20']:.4f}  NDCG@20 {m['ndcg@20']:.4f}",
              flush=True)
        return round(seconds, 1), epoch, round(m["recall@20"], 4), round(m["ndcg@20"], 4)

    curve = [validate(0.0, 0)]
    seconds, epoch, n = 0.0, 0, len(tr)
    step = 0
    while seconds < args.minutes * 60 and (not args.epochs or epoch < args.epochs):
        epoch += 1
        t0 = time.perf_counter()
        if args.sampling == "users":  # a uniform user, then one of its items
            users = rng.choice(active, n)
            pick = starts[users] + (rng.random(n) * (starts[users + 1] - starts[users])).astype(np.int64)
            items = tr.items[by_user[pick]]
        else:
            order = rng.permutation(n)
            users, items = tr.users[order], tr.items[order]
        for lo in range(0, n, args.batch_size):
            u, i = users[lo:lo + args.batch_size], items[lo:lo + args.batch_size]
            ut, it = torch.from_numpy(u), torch.from_numpy(i)
            nt = torch.from_numpy(rng.integers(0, n_items, args.negatives)) if args.loss == "shared-softmax" \
                else torch.from_numpy(sampler.sample(u, args.negatives))
            if args.schedule == "cosine":
                opt.param_groups[0]["lr"] = args.lr * 0.5 * (1 + np.cos(np.pi * step / horizon))
            step += 1
            final = propagate(adj, weight, 3)
            if args.loss == "bpr":
                loss = ranking_loss(final, weight, n_users, ut, it, nt, 0.0, args.reg)
            elif args.loss == "softmax":
                loss = softmax_loss(final, weight, n_users, ut, it, nt, args.reg)
            else:
                loss = shared_softmax_loss(final, weight, n_users, ut, it, nt, n_items, args.tau, args.reg, args.cosine)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds += time.perf_counter() - t0
        if epoch % args.eval_every == 0 or seconds >= args.minutes * 60 or epoch == args.epochs:
            curve.append(validate(seconds, epoch))
    print(json.dumps({"args": vars(args), "init_seconds": round(init_seconds, 1), "curve": curve}))


if __name__ == "__main__":
    main()
