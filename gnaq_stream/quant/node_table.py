"""A growable table of quantized nodes (one per node kind): levels, codes, float latent, version."""

from __future__ import annotations

import numpy as np
import torch

from gnaq_stream.quant.packing import pack_rows, round_levels, unpack_rows
from gnaq_stream.quant.quantizer import dequantize, init_from_embedding

LOAD_CHUNK = 1 << 16  # rows dequantised at a time when a table is loaded


class NodeTable:
    """Rows 0..n-1 hold nodes; capacity grows by a quarter as nodes arrive, so appends stay amortised
    O(1) with at most a quarter of the table unused.

    `latent` is the training-time float shadow of each node (offline `gnaq` keeps the same one); it is
    not stored: a table loaded from packed rows starts with latent = dequantised embedding. It is held
    in float16 (half the table's memory; training steps of ~1e-3 stay far above its resolution) and
    trained in float32. `mean` is
    the mean float embedding of the nodes, kept as a running mean of what was appended (the prior of
    a new node without neighbours); whoever dequantises the whole table may set it exactly.
    """

    def __init__(self, dim: int, bits: int, level_dtype: str, capacity: int = 1024):
        self.dim, self.bits, self.level_dtype = dim, bits, level_dtype
        self.n = 0
        self.levels = torch.zeros(capacity, 1 << bits)
        self.codes = torch.zeros(capacity, dim, dtype=torch.uint8)
        self.latent = torch.zeros(capacity, dim, dtype=torch.half)
        self.version = np.zeros(capacity, dtype=np.int64)
        self.mean = torch.zeros(dim)

    def _reserve(self, n: int) -> None:
        cap = self.levels.shape[0]
        if n <= cap:
            return
        new_cap = max(n, cap + cap // 4)
        for name in ("levels", "codes", "latent"):
            old = getattr(self, name)
            grown = torch.zeros((new_cap, *old.shape[1:]), dtype=old.dtype)
            grown[:cap] = old
            setattr(self, name, grown)
        self.version = np.concatenate([self.version, np.zeros(new_cap - cap, dtype=np.int64)])

    def append(self, embeddings: torch.Tensor, version: int) -> np.ndarray:
        """Add nodes initialised from float embeddings exactly as offline GNAQ does; their indices."""
        k = embeddings.shape[0]
        self._reserve(self.n + k)
        idx = np.arange(self.n, self.n + k)
        levels, codes = init_from_embedding(embeddings, self.bits)
        self.levels[self.n:self.n + k] = round_levels(levels, self.level_dtype)
        self.codes[self.n:self.n + k] = codes
        self.latent[self.n:self.n + k] = embeddings
        self.version[idx] = version
        self.mean = (self.mean * self.n + embeddings.sum(0)) / (self.n + k) if k else self.mean
        self.n += k
        return idx

    def load_rows(self, rows: np.ndarray, versions: np.ndarray) -> None:
        """Replace the table with packed rows (the store's and checkpoint's format)."""
        codes, levels = unpack_rows(rows, self.dim, self.bits, self.level_dtype)
        self.load(codes, levels, versions)

    def load(self, codes: np.ndarray, levels: torch.Tensor, versions: np.ndarray) -> None:
        """Replace the table with unpacked codes and levels."""
        self.n = 0
        self._reserve(len(codes))
        self.n = len(codes)
        self.levels[:self.n] = levels
        self.codes[:self.n] = torch.from_numpy(codes)
        self.version[:self.n] = versions
        total = torch.zeros(self.dim, dtype=torch.float64)
        for start in range(0, self.n, LOAD_CHUNK):  # in slices: no full-table float temporaries (a restart)
            rows = slice(start, min(start + LOAD_CHUNK, self.n))
            x = dequantize(self.levels[rows], self.codes[rows])
            self.latent[rows] = x
            total += x.sum(0, dtype=torch.float64)
        self.mean = (total / max(self.n, 1)).float()

    def embeddings(self, idx: np.ndarray | None = None) -> torch.Tensor:
        """Dequantised layer-0 embeddings (all nodes when idx is None)."""
        if idx is None:
            return dequantize(self.levels[:self.n], self.codes[:self.n])
        levels, codes = self._rows(idx)
        return dequantize(levels, codes)

    def packed(self, idx: np.ndarray) -> np.ndarray:
        levels, codes = self._rows(idx)
        return pack_rows(codes.numpy(), levels, self.bits, self.level_dtype)

    def _rows(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Levels and codes of these nodes; index_select is several times faster than [idx] on CPU."""
        rows = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return self.levels.index_select(0, rows), self.codes.index_select(0, rows)
