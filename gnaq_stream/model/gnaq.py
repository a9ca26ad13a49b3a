"""Layer-0 embedding tables (full precision and node-wise quantized) and the LightGCN recommender
built on them. Every method of the CLI is a `MethodSpec`: one code path, different switches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gnaq_stream.errors import ConfigError
from gnaq_stream.model.lightgcn import propagate
from gnaq_stream.quant.packing import check_bits, round_levels
from gnaq_stream.quant.quantizer import (dequantize, init_from_embedding, nearest_codes, neighbour_trust,
                                        rau_codes, rebin_codes)


@dataclass(frozen=True)
class MethodSpec:
    quantized: bool
    latent: bool = False         # a float latent table receives straight-through gradients
    learn_levels: bool = False   # dynamic quantization step: levels are trained by gradient
    tanh: bool = False           # the published recipe squashes dequantised values with tanh
    code_rule: str = "none"      # "rau" | "rebin" (published) | "ste" (nearest static level each forward)
    rau: bool = True             # with code_rule "rau": mix in the neighbour aggregate (else own latent only)
    lambda_loss: bool = True
    negatives: int = 0           # negatives per positive; 0: the run's --n-negatives
    item_bias: bool = False      # a learned score offset per item (user and global offsets cancel in BPR and ranking)
    continues: bool = True       # starts from a trained float model at the continuation learning rate


METHODS: dict[str, MethodSpec] = {
    # LightGCN's objective, BPR, averaged over 8 uniform negatives per positive instead of LightGCN's one:
    # more signal per propagation, so faster to converge on CPU (docs/benchmarks.md, "Full-precision recipe")
    "fp": MethodSpec(quantized=False, lambda_loss=False, negatives=8, continues=False),
    "fp-continued": MethodSpec(quantized=False),
    "gnaq": MethodSpec(quantized=True, latent=True, learn_levels=True, code_rule="rau"),
    # the authors' code: BPR with 5 negatives, bias terms, codes re-binned from the forward pass's propagation
    "gnaq-paper": MethodSpec(quantized=True, learn_levels=True, tanh=True, code_rule="rebin", lambda_loss=False,
                             negatives=5, item_bias=True),
    "ste": MethodSpec(quantized=True, latent=True, code_rule="ste"),
    "no-rau": MethodSpec(quantized=True, latent=True, learn_levels=True, code_rule="rau", rau=False),
    "no-dqs": MethodSpec(quantized=True, latent=True, code_rule="rau"),
    "no-lambda": MethodSpec(quantized=True, latent=True, learn_levels=True, code_rule="rau", lambda_loss=False),
}


def method_spec(method: str) -> MethodSpec:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method]


class FullEmbedding(nn.Module):
    """A float32 layer-0 table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(table.clone().float())

    def layer0(self) -> torch.Tensor:
        return self.weight

    def update_codes(self, adj: torch.Tensor, n_layers: int, propagated: torch.Tensor | None = None) -> None:
        """Nothing to re-derive in a float table."""


class QuantizedEmbedding(nn.Module):
    """Per node: 2^bits levels and D codes, plus the float latent of methods that keep one."""

    def __init__(self, levels: torch.Tensor, codes: torch.Tensor, latent: torch.Tensor | None, bits: int,
                 spec: MethodSpec, rau_alpha: float, rau_half_degree: float):
        super().__init__()
        check_bits(bits)
        self.bits, self.spec = bits, spec
        self.rau_alpha, self.rau_half_degree = rau_alpha, rau_half_degree
        self.levels = nn.Parameter(levels.float(), requires_grad=spec.learn_levels)
        self.register_buffer("codes", codes)
        self.latent = nn.Parameter(latent.float()) if spec.latent else None

    def layer0(self) -> torch.Tensor:
        if self.spec.code_rule == "ste":
            self.codes = nearest_codes(self.latent.detach(), self.levels.detach())
        x = dequantize(self.levels, self.codes)
        if self.latent is not None:
            x = x + (self.latent - self.latent.detach())
        return torch.tanh(x) if self.spec.tanh else x

    @torch.no_grad()
    def update_codes(self, adj: torch.Tensor, n_layers: int, propagated: torch.Tensor | None = None) -> None:
        """Re-derive codes after an optimiser step (RAU or the published re-binning). The re-binning
        reads `propagated`, the step's forward propagation (as the authors' code), when given."""
        if self.spec.code_rule == "rau":
            current = self.layer0()
            if self.spec.rau:
                aggregate = torch.sparse.mm(adj, current)
                mix = neighbour_trust(adj.crow_indices().diff(), self.rau_alpha, self.rau_half_degree)
                self.codes = rau_codes(self.latent, aggregate, self.levels, mix)
            else:
                self.codes = nearest_codes(self.latent, self.levels)
        elif self.spec.code_rule == "rebin":
            if propagated is None:
                propagated = propagate(adj, self.layer0(), n_layers)
            self.codes = rebin_codes(propagated, self.bits)

    def stored_levels(self, level_dtype: str) -> torch.Tensor:
        return round_levels(self.levels, level_dtype)


class Recommender(nn.Module):
    """LightGCN over a layer-0 table of n_users + n_items nodes (users first); with `item_bias`, a
    learned offset per item is added to its scores."""

    def __init__(self, n_users: int, n_items: int, embedding: nn.Module, n_layers: int = 3, item_bias: bool = False):
        super().__init__()
        self.n_users, self.n_items, self.n_layers = n_users, n_items, n_layers
        self.embedding = embedding
        self.item_bias = nn.Parameter(torch.zeros(n_items)) if item_bias else None

    def final_embeddings(self, adj: torch.Tensor) -> torch.Tensor:
        return propagate(adj, self.embedding.layer0(), self.n_layers)


def build_embedding(method: str, table: torch.Tensor, bits: int, rau_alpha: float,
                    rau_half_degree: float, level_init: str) -> nn.Module:
    """The method's layer-0 table, quantized from a float table (see quant.quantizer)."""
    spec = method_spec(method)
    if not spec.quantized:
        return FullEmbedding(table)
    check_bits(bits)
    table = table.detach().float()
    levels, codes = init_from_embedding(table, bits, level_init)
    if spec.code_rule == "rebin":
        # published initialisation: levels m + k(M-m)/(2^n+1), k = 1..2^n
        lo, hi = table.min(1, keepdim=True).values, table.max(1, keepdim=True).values
        k = torch.arange(1, (1 << bits) + 1, dtype=torch.float32)
        levels = lo + k * (hi - lo) / ((1 << bits) + 1)
    return QuantizedEmbedding(levels, codes, table.clone(), bits, spec, rau_alpha, rau_half_degree)
