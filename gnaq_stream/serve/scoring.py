"""Top-K scoring straight from packed rows (gnaq_stream.quant.packing), no fp32 item matrix.

What is served is each node's *serving row*: its final (propagated, layer-mean) LightGCN embedding
quantized node-wise exactly as GNAQ initialises a node (levels over its range, codes by binning), so
a replica needs neither the graph nor a propagation step. The score of item i for a user vector f is

    sum_d f[d] * L_i[c_id] = sum_k L_i[k] * S_ik,   S_ik = sum of f over the dims whose code is k.

`ItemIndex` holds a replica's item rows and answers exact top-K. For 2-bit rows (the default) it
keeps them in 64-item blocks and runs the compiled fast scan (_fastscan.c: an 8-bit lookup pass
bounds every score, and only items that can still make the top K are scored exactly), with the
best kernel the CPU has: AVX-512, AVX2, or portable C, which is still 1.5-2x faster than the
numba kernels (GNAQ_FASTSCAN_KERNEL forces one; `ItemIndex.kernel` says which runs). Other rows,
or a build without a C compiler, are scored by the numba kernels of `PackedScorer`: when codes
pack evenly into bytes (1, 2, 4 bits), S_i is the sum over the row's code bytes of a table
T[byte position, byte value] built once per request from f; 3- and 8-bit rows decode code by code.
Levels are decoded from their stored dtype inside the loop, so nothing but packed rows is held.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch

from gnaq_stream.quant.packing import check_level_dtype, code_bytes, row_bytes

try:
    from gnaq_stream.serve import _fastscan
except ImportError:  # built without a C compiler: the numba kernels serve
    _fastscan = None


def _level_lut(level_dtype: str) -> np.ndarray:
    """float32 value of every bit pattern of a 1- or 2-byte level dtype (empty for fp32)."""
    dtype = check_level_dtype(level_dtype)
    if dtype.itemsize == 4:
        return np.zeros(0, dtype=np.float32)
    patterns = torch.arange(1 << (8 * dtype.itemsize), dtype=torch.int32)
    raw = patterns.to(torch.uint8 if dtype.itemsize == 1 else torch.int16)
    return raw.view(dtype).to(torch.float32).nan_to_num(0.0).numpy()


@numba.njit(cache=True, inline="always")
def _level(row: np.ndarray, start: int, k: int, width: int, lut: np.ndarray) -> float:
    at = start + k * width
    if width == 1:
        return lut[row[at]]
    if width == 2:
        return lut[row[at] | (np.int32(row[at + 1]) << 8)]
    bits32 = np.empty(1, dtype=np.uint32)
    bits32[0] = row[at] | (np.uint32(row[at + 1]) << 8) | (np.uint32(row[at + 2]) << 16) | (np.uint32(row[at + 3]) << 24)
    return bits32.view(np.float32)[0]


@numba.njit(cache=True, inline="always")
def _code(row: np.ndarray, d: int, bits: int, mask: int) -> int:
    """Code of dimension d in a row's little-endian bit stream."""
    bit = d * bits
    word = np.int32(row[bit >> 3])
    if (bit & 7) + bits > 8:
        word |= np.int32(row[(bit >> 3) + 1]) << 8
    return (word >> (bit & 7)) & mask


@numba.njit(cache=True)
def _row_vector(row: np.ndarray, dim: int, bits: int, n_bytes: int, width: int, lut: np.ndarray) -> np.ndarray:
    """One packed row, dequantised."""
    levels = np.empty(1 << bits, dtype=np.float32)
    for k in range(1 << bits):
        levels[k] = _level(row, n_bytes, k, width, lut)
    out = np.empty(dim, dtype=np.float32)
    for d in range(dim):
        out[d] = levels[_code(row, d, bits, (1 << bits) - 1)]
    return out


@numba.njit(cache=True)
def _byte_tables(user: np.ndarray, bits: int, n_bytes: int) -> np.ndarray:
    """T[b, v, k] = sum of user[j] over the dims j packed in byte b whose code in value v is k."""
    per_byte = 8 // bits
    n_levels = 1 << bits
    mask = n_levels - 1
    table = np.zeros((n_bytes, 256, n_levels), dtype=np.float32)
    for b in range(n_bytes):
        for v in range(256):
            for j in range(per_byte):
                d = b * per_byte + j
                if d < user.shape[0]:
                    table[b, v, (v >> (j * bits)) & mask] += user[d]
    return table


# Kernels are built per bit width so that the number of levels is a compile-time constant: the
# inner loops then unroll and vectorise (measured 3.5x faster than a runtime-sized loop).
@functools.cache
def _byte_kernel(n_levels: int):
    @numba.njit(fastmath=True, parallel=True, boundscheck=False)
    def scores(rows: np.ndarray, n: int, table: np.ndarray, width: int, lut: np.ndarray) -> np.ndarray:
        n_bytes = table.shape[0]
        flat = table.ravel()
        out = np.empty(n, dtype=np.float32)
        for i in numba.prange(n):
            row = rows[i]
            partial = np.zeros(n_levels, dtype=np.float32)
            for b in range(n_bytes):
                at = (b * 256 + row[b]) * n_levels
                for k in range(n_levels):
                    partial[k] += flat[at + k]
            score = np.float32(0.0)
            for k in range(n_levels):
                score += partial[k] * _level(row, n_bytes, k, width, lut)
            out[i] = score
        return out

    return scores


@functools.cache
def _code_kernel(bits: int):
    n_levels = 1 << bits
    mask = n_levels - 1

    @numba.njit(fastmath=True, parallel=True, boundscheck=False)
    def scores(rows: np.ndarray, n: int, user: np.ndarray, n_bytes: int, width: int, lut: np.ndarray) -> np.ndarray:
        out = np.empty(n, dtype=np.float32)
        for i in numba.prange(n):
            row = rows[i]
            levels = np.empty(n_levels, dtype=np.float32)
            for k in range(n_levels):
                levels[k] = _level(row, n_bytes, k, width, lut)
            score = np.float32(0.0)
            for d in range(user.shape[0]):
                score += user[d] * levels[_code(row, d, bits, mask)]
            out[i] = score
        return out

    return scores


BYTE_TABLE_BITS = (1, 2, 4)  # codes pack evenly into bytes and the per-request table stays small


class PackedScorer:
    """Scores a user vector against the first `n` of a block of packed item rows (numba kernels)."""

    def __init__(self, dim: int, bits: int, level_dtype: str):
        self.dim, self.bits, self.level_dtype = dim, bits, level_dtype
        self.n_bytes = code_bytes(dim, bits)
        self.width = check_level_dtype(level_dtype).itemsize
        self.lut = _level_lut(level_dtype)
        self.scores(np.zeros(dim, dtype=np.float32), np.zeros((1, row_bytes(dim, bits, level_dtype)), np.uint8), 1)

    def user_vector(self, row: np.ndarray) -> np.ndarray:
        """A user's serving row, dequantised (one row: cheap)."""
        return _row_vector(row, self.dim, self.bits, self.n_bytes, self.width, self.lut)

    def scores(self, user: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
        """Scores of rows[:n] for a user vector (float32)."""
        if self.bits in BYTE_TABLE_BITS:
            table = _byte_tables(user, self.bits, self.n_bytes)
            return _byte_kernel(1 << self.bits)(rows, n, table, self.width, self.lut)
        return _code_kernel(self.bits)(rows, n, user, self.n_bytes, self.width, self.lut)


def compiled_kernel_serves(dim: int, bits: int) -> bool:
    """Whether `ItemIndex` uses the compiled fast scan for rows of this shape (on any CPU: its
    portable kernel measured 1.5-2x faster than the numba kernels, so it is preferred to them)."""
    return bool(_fastscan and bits == 2 and dim % 4 == 0 and 4 <= dim <= 256)


class ItemIndex:
    """Packed item rows in the layout the scorer reads (64-item blocks for the compiled kernel,
    plain rows otherwise), growable, with exact top-K for a user vector."""

    def __init__(self, dim: int, bits: int, level_dtype: str, compiled: bool | None = None):
        self.scorer = PackedScorer(dim, bits, level_dtype)
        self.row_width = row_bytes(dim, bits, level_dtype)
        self.compiled = compiled_kernel_serves(dim, bits) if compiled is None else compiled
        # a block holds 64 rows' bytes, rearranged
        self.unit, unit_bytes = (_fastscan.BLOCK, _fastscan.BLOCK * self.row_width) if self.compiled \
            else (1, self.row_width)
        self.data = np.zeros((0, unit_bytes), dtype=np.uint8)
        self.n = 0

    def put(self, indices: np.ndarray, rows: np.ndarray) -> None:
        """Write packed rows (one per index), growing the table as needed."""
        indices = np.ascontiguousarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return
        end = int(indices.max()) + 1
        units = -(-end // self.unit)
        if units > len(self.data):
            grown = np.zeros((max(units, 2 * len(self.data)), self.data.shape[1]), dtype=np.uint8)
            grown[:len(self.data)] = self.data
            self.data = grown
        if self.compiled:
            s = self.scorer
            _fastscan.set_rows(self.data, s.dim, s.width, indices, np.ascontiguousarray(rows, dtype=np.uint8))
        else:
            self.data[indices] = rows
        self.n = max(self.n, end)

    def top_k(self, user: np.ndarray, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices and scores of the k best items, best first, never an excluded index."""
        if not self.compiled:
            return top_k(self.scorer.scores(user, self.data, self.n), k, exclude)
        s = self.scorer
        k = max(k, 1)
        idx, val = np.empty(k, dtype=np.int64), np.empty(k, dtype=np.float32)
        count = _fastscan.top_k(self.data, self.n, s.dim, s.width, np.ascontiguousarray(user, dtype=np.float32), k,
                                np.unique(np.asarray(exclude, dtype=np.int64)), s.lut, idx, val)
        return idx[:count], val[:count]

    @property
    def kernel(self) -> str:
        """What scores: a fast-scan kernel ("avx512", "avx2", "portable") or "numba"."""
        return _fastscan.kernel() if self.compiled else "numba"

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (a packed row's bytes per item, in either layout)."""
        return self.n * self.row_width


@numba.njit(cache=True, boundscheck=False)
def _best(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One pass keeping the k best in a sorted buffer; on ties the lower index ranks first."""
    idx = np.full(k, -1, dtype=np.int64)
    val = np.full(k, -np.inf, dtype=np.float32)
    for i in range(scores.shape[0]):
        s = scores[i]
        if s > val[k - 1]:
            j = k - 1
            while j > 0 and val[j - 1] < s:
                val[j] = val[j - 1]
                idx[j] = idx[j - 1]
                j -= 1
            val[j] = s
            idx[j] = i
    return idx, val


def top_k(scores: np.ndarray, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k best, best first, never an excluded index; consumes `scores`."""
    scores[exclude[exclude < len(scores)]] = -np.inf
    idx, val = _best(scores, max(k, 1))
    keep = idx[:k] >= 0
    return idx[:k][keep], val[:k][keep]
