"""What serving rows cost in ranking: the product's serving quantizer against alternatives, in process.

A replica scores with serving rows: each node's final (propagated) embedding quantized node-wise
(`quantize_rows`: levels at the means of 2^n equal intervals of the node's range, fp8). This probe
asks what else could keep >= 98% of the model's Recall@20 at >= 10x less memory than fp32 (issue 14)
by quantizing the same final embeddings several ways and ranking with them, on the validation split
(train as the graph; the split every choice is made on) and on the test split (train + validation as
the graph). Alternatives that are not in the product are written here only:

- `lloyd`: the product's levels refined by 10 Lloyd iterations (codes nearest, levels the means);
- `users float`: user rows left unquantized (what the user side costs);
- `affine`: 2^n uniform levels between the row's min and max, stored as two fp8 numbers;
- `symmetric`: 2^n uniform levels in [-a, a], a = the row's largest |value| as one fp8 number;
- `score-aware`: the same row formats with codes (and the symmetric scale) chosen for ranking, not
  for the squared error: a user's row is ranked with only by its direction, so its codes maximise
  the cosine to the user's embedding; an item's error along its own embedding moves its score with
  every user that ranks it high, so its codes minimise |r|^2 + (eta - 1) (r . x/|x|)^2 (ScaNN's
  anisotropic loss, eta 4) for r the row's error; by coordinate descent over dimensions from the
  nearest codes; for `symmetric` the scale is the best of five fractions of the largest |value|.

    python benchmarks/serving_quantizer.py --checkpoints runs/benchmarks/gowalla/fp \
        runs/benchmarks/gowalla/gnaq-2-44-seed1 --dataset gowalla
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from gnaq_stream.checkpoint import load_checkpoint  # noqa: E402
from gnaq_stream.data.datasets import InteractionData, carve_validation, load_dataset  # noqa: E402
from gnaq_stream.graph.interaction_graph import normalized_adjacency  # noqa: E402
from gnaq_stream.model.lightgcn import propagate  # noqa: E402
from gnaq_stream.quant.packing import round_levels  # noqa: E402
from gnaq_stream.quant.quantizer import dequantize, init_from_embedding, nearest_codes  # noqa: E402
from gnaq_stream.train.evaluation import evaluate_ranking, interaction_matrix  # noqa: E402
from gnaq_stream.train.trainer import _known_before  # noqa: E402

FP8 = torch.float8_e4m3fn


def product(x: torch.Tensor, bits: int) -> torch.Tensor:
    levels, codes = init_from_embedding(x, bits)
    return dequantize(round_levels(levels, "fp8"), codes)


def lloyd(x: torch.Tensor, bits: int, iterations: int = 10) -> torch.Tensor:
    levels, codes = init_from_embedding(x, bits)
    for _ in range(iterations):
        codes = nearest_codes(x, levels)
        count = torch.zeros_like(levels).scatter_add_(1, codes.long(), torch.ones_like(x))
        total = torch.zeros_like(levels).scatter_add_(1, codes.long(), x)
        levels = torch.where(count > 0, total / count.clamp_min(1), levels)
    levels = round_levels(levels, "fp8")
    return dequantize(levels, nearest_codes(x, levels))


def symmetric_levels(x: torch.Tensor, bits: int, share: float = 1.0) -> torch.Tensor:
    """2^n uniform levels in [-a, a], a = `share` x the row's largest |value| as one fp8 number."""
    a = (x.abs().amax(1, keepdim=True) * share).to(FP8).float()
    steps = torch.arange(1 << bits, dtype=torch.float32) / ((1 << bits) - 1)
    return -a + 2 * a * steps


def uniform(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    if symmetric:
        levels = symmetric_levels(x, bits)
    else:
        lo, hi = x.amin(1, keepdim=True).to(FP8).float(), x.amax(1, keepdim=True).to(FP8).float()
        levels = lo + (hi - lo) * (torch.arange(1 << bits, dtype=torch.float32) / ((1 << bits) - 1))
    return dequantize(levels, nearest_codes(x, levels))


def angle_codes(x: torch.Tensor, levels: torch.Tensor, sweeps: int = 2) -> torch.Tensor:
    """Codes whose row has the largest cosine with x: each dimension in turn takes the level that
    maximises it given the others."""
    codes = nearest_codes(x, levels).long()
    q = levels.gather(1, codes)
    dot, nsq = (q * x).sum(1, keepdim=True), (q * q).sum(1, keepdim=True)
    for _ in range(sweeps):
        for d in range(x.shape[1]):
            old = q[:, d:d + 1]
            cosine = (dot + (levels - old) * x[:, d:d + 1]) / (nsq + levels ** 2 - old ** 2).clamp_min(1e-12).sqrt()
            k = cosine.argmax(1, keepdim=True)
            new = levels.gather(1, k)
            dot, nsq = dot + (new - old) * x[:, d:d + 1], nsq + new ** 2 - old ** 2
            q[:, d:d + 1], codes[:, d:d + 1] = new, k
    return codes


def anisotropic_codes(x: torch.Tensor, levels: torch.Tensor, eta: float, sweeps: int = 2) -> torch.Tensor:
    """Codes minimising |r|^2 + (eta - 1) (r . x/|x|)^2, r = x - the row, dimension by dimension."""
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    codes = nearest_codes(x, levels).long()
    r = x - levels.gather(1, codes)
    along = (r * unit).sum(1, keepdim=True)
    for _ in range(sweeps):
        for d in range(x.shape[1]):
            cand = x[:, d:d + 1] - levels
            cost = cand ** 2 + (eta - 1) * (along + (cand - r[:, d:d + 1]) * unit[:, d:d + 1]) ** 2
            k = cost.argmin(1, keepdim=True)
            new = cand.gather(1, k)
            along = along + (new - r[:, d:d + 1]) * unit[:, d:d + 1]
            r[:, d:d + 1], codes[:, d:d + 1] = new, k
    return codes


def ranking_cost(x: torch.Tensor, q: torch.Tensor, user: bool, eta: float) -> torch.Tensor:
    """Per row, what `angle_codes` (users) or `anisotropic_codes` (items) minimise."""
    if user:
        return -(x * q).sum(1) / q.norm(dim=1).clamp_min(1e-12)
    r = x - q
    return r.square().sum(1) + (eta - 1) * (r * x).sum(1).square() / x.square().sum(1).clamp_min(1e-12)


def score_aware(x: torch.Tensor, bits: int, user: bool, symmetric: bool, eta: float = 4.0) -> torch.Tensor:
    pick = (lambda levels: angle_codes(x, levels)) if user else (lambda levels: anisotropic_codes(x, levels, eta))
    if not symmetric:
        levels = round_levels(init_from_embedding(x, bits)[0], "fp8")
        return dequantize(levels, pick(levels))
    best, best_cost = None, None
    for share in (0.55, 0.65, 0.75, 0.85, 1.0):
        levels = symmetric_levels(x, bits, share)
        q = dequantize(levels, pick(levels))
        cost = ranking_cost(x, q, user, eta)
        if best is None:
            best, best_cost = q, cost
        else:
            best, best_cost = torch.where((cost < best_cost)[:, None], q, best), torch.minimum(cost, best_cost)
    return best


# name -> (bytes per node: codes + levels, or None for float user rows; user rows; item rows)
def variants(dim: int) -> dict:
    codes = {b: dim * b // 8 for b in (2, 3, 4)}
    return {
        "product, 2 bits": (codes[2] + 4, lambda x: product(x, 2), lambda x: product(x, 2)),
        "product, 2 bits, users float": (None, lambda x: x, lambda x: product(x, 2)),
        "lloyd, 2 bits": (codes[2] + 4, lambda x: lloyd(x, 2), lambda x: lloyd(x, 2)),
        "score-aware, 2 bits": (codes[2] + 4, lambda x: score_aware(x, 2, True, False),
                                lambda x: score_aware(x, 2, False, False)),
        "product, 3 bits": (codes[3] + 8, lambda x: product(x, 3), lambda x: product(x, 3)),
        "affine, 3 bits": (codes[3] + 2, lambda x: uniform(x, 3, False), lambda x: uniform(x, 3, False)),
        "symmetric, 3 bits": (codes[3] + 1, lambda x: uniform(x, 3, True), lambda x: uniform(x, 3, True)),
        "symmetric, 3 bits, score-aware": (codes[3] + 1, lambda x: score_aware(x, 3, True, True),
                                           lambda x: score_aware(x, 3, False, True)),
        "product, 4 bits": (codes[4] + 16, lambda x: product(x, 4), lambda x: product(x, 4)),
    }


@torch.no_grad()
def recall(data: InteractionData, final: torch.Tensor, split: str, users_fn, items_fn) -> float:
    known = _known_before(data, split)
    truth = interaction_matrix(data.n_users, data.n_items, getattr(data, split))
    exclude = interaction_matrix(data.n_users, data.n_items, known)
    return evaluate_ranking(users_fn(final[:data.n_users]), items_fn(final[data.n_users:]), truth, exclude)["recall@20"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--checkpoints", nargs="+", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--valid-share", type=float, default=0.1, help="the carve the checkpoints were trained with")
    args = p.parse_args()
    data = carve_validation(load_dataset(args.dataset, args.data_dir), args.valid_share)
    lines = ["| checkpoint | serving rows | bytes per node | vs fp32 | valid R@20 served / model | test R@20 served / model |",
             "|---|---|---|---|---|---|"]
    for path in args.checkpoints:
        model = load_checkpoint(path)
        finals = {}
        for split in ("valid", "test"):
            known = _known_before(data, split)
            adj = normalized_adjacency(data.n_users, data.n_items, known.users, known.items)
            finals[split] = propagate(adj, model.layer0(), model.n_layers)
        exact = {s: recall(data, f, s, lambda x: x, lambda x: x) for s, f in finals.items()}
        for name, (size, users_fn, items_fn) in variants(model.dim).items():
            got = {s: recall(data, f, s, users_fn, items_fn) for s, f in finals.items()}
            cells = " | ".join(f"{got[s]:.4f} / {exact[s]:.4f} ({got[s] / exact[s]:.1%})" for s in ("valid", "test"))
            bytes_cell = f"{size} | {4 * model.dim / size:.1f}x" if size else "items only | -"
            lines.append(f"| {Path(path).name} | {name} | {bytes_cell} | {cells} |")
            print(lines[-1], flush=True)
    write_section(f"serving_quantizer_{args.dataset}", f"""## Serving rows against the model (`benchmarks/serving_quantizer.py`, {args.dataset})

Final embeddings of each checkpoint quantized for serving in several ways and ranked with (full
ranking, Recall@20), on the carved validation split (train as the graph) and on test (train +
validation); percentages are served / model. Bytes per node at dim {model.dim} (codes + levels); vs fp32 =
{4 * model.dim} bytes / that. Target (issue 14): >= 98% of the model's Recall@20 at >= 10x.

""" + "\n".join(lines))


if __name__ == "__main__":
    main()
