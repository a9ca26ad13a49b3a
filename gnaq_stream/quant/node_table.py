"""A growable table of quantized nodes (one per node kind): packed rows, training latent, version."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from gnaq_stream.quant.int8_rows import Int8Rows
from gnaq_stream.quant.packing import pack_rows, round_levels, row_bytes, unpack_rows
from gnaq_stream.quant.quantizer import dequantize, init_from_embedding

CHUNK = 1 << 16  # rows unpacked at a time over the whole table: no full-table temporaries but the result
MEAN_SAMPLE = 1 << 16  # rows a loaded table's mean is estimated from


class NodeTable:
    """Rows 0..n-1 hold nodes; capacity grows by a quarter as nodes arrive, so appends stay amortised
    O(1) with at most a quarter of the table unused.

    `rows` hold each node's codes and levels in the stored row format (quant.packing: 20 bytes at dim
    64, 2 bits, fp8 levels, where unpacked codes and float32 levels take 80), so memory equals what
    is stored: levels are rounded to their dtype whenever they are written.

    The latent is the training-time float shadow of each node (offline `gnaq` keeps the same one); it
    is not stored: a table loaded from packed rows starts with latent = dequantised embedding. It is
    held as its difference from the node's dequantised row, in int8 rows (68 bytes at dim 64 where
    float16 took 128): that difference is about a level spacing at most, so its resolution (1/254 of
    the row's largest difference) stays well under a training step. `mean` is the mean float
    embedding of the nodes, kept as a running mean of what was appended (the prior of a new node
    without neighbours); whoever dequantises the whole table may set it exactly (loading estimates it
    from a sample).
    """

    def __init__(self, dim: int, bits: int, level_dtype: str, capacity: int = 1024):
        self.dim, self.bits, self.level_dtype = dim, bits, level_dtype
        self.n = 0
        self.rows = np.zeros((capacity, row_bytes(dim, bits, level_dtype)), dtype=np.uint8)
        self.residual = Int8Rows(torch.zeros(capacity, dim))  # latent - dequantised row
        self.version = np.zeros(capacity, dtype=np.int64)
        self.mean = torch.zeros(dim)

    @property
    def nbytes(self) -> int:
        """Memory held, capacity included."""
        return self.rows.nbytes + self.residual.nbytes + self.version.nbytes

    def _reserve(self, n: int) -> None:
        cap = len(self.rows)
        if n <= cap:
            return
        new_cap = max(n, cap + cap // 4)
        grown = np.zeros((new_cap, self.rows.shape[1]), dtype=np.uint8)
        grown[:cap] = self.rows
        self.rows = grown
        self.residual.grow(new_cap)
        self.version = np.concatenate([self.version, np.zeros(new_cap - cap, dtype=np.int64)])

    def append(self, embeddings: torch.Tensor, version: int) -> np.ndarray:
        """Add nodes initialised from float embeddings exactly as offline GNAQ does; their indices."""
        k = embeddings.shape[0]
        self._reserve(self.n + k)
        idx = np.arange(self.n, self.n + k)
        levels, codes = init_from_embedding(embeddings, self.bits)
        self.write(idx, round_levels(levels, self.level_dtype), codes, embeddings)
        self.version[idx] = version
        self.mean = (self.mean * self.n + embeddings.sum(0)) / (self.n + k) if k else self.mean
        self.n += k
        return idx

    def load_rows(self, rows: np.ndarray, versions: np.ndarray) -> None:
        """Replace the table with packed rows (the store's and checkpoint's format)."""
        self.n = 0
        self._reserve(len(rows))
        self.n = len(rows)
        self.rows[:self.n] = rows
        self.version[:self.n] = versions
        for start in range(0, self.n, CHUNK):  # in slices: no full-table float temporaries (a restart)
            end = min(start + CHUNK, self.n)
            self.residual.write(slice(start, end), torch.zeros(end - start, self.dim))  # latent = row
        # the prior's mean from at most MEAN_SAMPLE evenly spread rows (exact below that): dequantising
        # every row for it took 2 s of a 30 s restart at 5M nodes, and the next propagation sets it exactly
        sample = np.unique(np.linspace(0, self.n - 1, min(self.n, MEAN_SAMPLE)).astype(np.int64))
        self.mean = self.embeddings(sample).mean(0) if self.n else torch.zeros(self.dim)

    def load(self, codes: np.ndarray, levels: torch.Tensor, versions: np.ndarray) -> None:
        """Replace the table with unpacked codes and levels (levels as their dtype stores them)."""
        self.load_rows(pack_rows(codes, levels, self.bits, self.level_dtype), versions)

    def embeddings(self, idx: np.ndarray | None = None) -> torch.Tensor:
        """Dequantised layer-0 embeddings (all nodes when idx is None)."""
        if idx is not None:
            return dequantize(*self.levels_codes(idx))
        return self._dequantize_all(self.rows[:self.n])

    def embeddings_snapshot(self) -> Callable[[], torch.Tensor]:
        """A function giving every node's embedding as of now, for another thread (a background
        propagation) while this table goes on changing: it dequantises a copy of the packed rows
        (20 bytes a node at dim 64, 2 bits: a fast copy, where dequantising here would take seconds)."""
        rows = self.rows[:self.n].copy()
        return lambda: self._dequantize_all(rows)

    def _dequantize_all(self, rows: np.ndarray) -> torch.Tensor:
        out = torch.empty(len(rows), self.dim)
        for start in range(0, len(rows), CHUNK):
            codes, levels = unpack_rows(rows[start:start + CHUNK], self.dim, self.bits, self.level_dtype)
            out[start:start + len(codes)] = dequantize(levels, torch.from_numpy(codes))
        return out

    def packed(self, idx: np.ndarray) -> np.ndarray:
        """Stored rows of these nodes."""
        return self.rows.take(np.asarray(idx, dtype=np.int64), axis=0)

    def levels_codes(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 levels and uint8 codes of these nodes."""
        codes, levels = unpack_rows(self.packed(idx), self.dim, self.bits, self.level_dtype)
        return levels, torch.from_numpy(codes)

    def training_rows(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 levels, uint8 codes and float32 training latent of these nodes."""
        levels, codes = self.levels_codes(idx)
        difference = self.residual.rows(torch.from_numpy(np.asarray(idx, dtype=np.int64)))
        return levels, codes, dequantize(levels, codes) + difference

    def write(self, idx: np.ndarray, levels: torch.Tensor, codes: torch.Tensor, latent: torch.Tensor) -> None:
        """Set these nodes' levels (already rounded to the level dtype: packing rounds to nearest),
        codes and latent."""
        idx = np.asarray(idx, dtype=np.int64)
        self.rows[idx] = pack_rows(codes.numpy(), levels, self.bits, self.level_dtype)
        self.residual.write(torch.from_numpy(idx), latent.detach().float() - dequantize(levels, codes))
