"""The one byte layout of a quantized node row, shared by checkpoints, the store, the updates topic
and serving.

Row of a node with D dimensions at n bits and 2^n levels:
    codes   ceil(D*n/8) bytes: code j occupies bits [j*n, (j+1)*n) of the row's little-endian bit
            stream (at 2 bits: byte 0 holds codes 0..3, code 0 in its lowest two bits)
    levels  2^n values in the level dtype, little-endian, level k at position k
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from gnaq_stream.errors import ConfigError, GnaqError
from gnaq_stream.quant.quantizer import init_from_embedding

SUPPORTED_BITS = (1, 2, 3, 4, 8)
LEVEL_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "fp8": torch.float8_e4m3fn,
}


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return bits


def check_level_dtype(name: str) -> torch.dtype:
    if name not in LEVEL_DTYPES:
        raise ConfigError(f"level dtype must be one of {sorted(LEVEL_DTYPES)}, got {name!r}")
    return LEVEL_DTYPES[name]


def code_bytes(dim: int, bits: int) -> int:
    return math.ceil(dim * bits / 8)


def level_bytes(bits: int, level_dtype: str) -> int:
    return (1 << bits) * check_level_dtype(level_dtype).itemsize


def row_bytes(dim: int, bits: int, level_dtype: str) -> int:
    """Exact bytes stored per node: packed codes plus its level table."""
    return code_bytes(dim, bits) + level_bytes(bits, level_dtype)


def check_row_format(dim: int, bits: int, level_dtype: str) -> int:
    """Row bytes of nodes of `dim` dimensions at `bits` with `level_dtype` levels; a ConfigError when
    that row is not smaller than the node's float32 embedding (then quantizing only costs accuracy)."""
    size = row_bytes(dim, check_bits(bits), level_dtype)
    if size >= 4 * dim:
        fits_from = next(d for d in itertools.count(dim + 1) if row_bytes(d, bits, level_dtype) < 4 * d)
        raise ConfigError(f"{bits} bits with {level_dtype} levels take {size} bytes per node at dim {dim}, not less "
                          f"than float32's {4 * dim}: use fewer bits or smaller levels (or dim >= {fits_from})")
    return size


class LevelRangeError(GnaqError, ValueError):
    """Levels the level dtype cannot hold: not finite, or beyond its largest value."""


def check_levels(levels: torch.Tensor, level_dtype: str) -> None:
    """Refuse levels `level_dtype` cannot store, where they are stored: fp8 e4m3fn would saturate them
    at +-448 and fp16 turn them into inf without a word, and NaN would be stored as is. One vectorised
    pass when they fit (aminmax: ~1/10 of the dtype conversion itself; NaN compares false)."""
    levels = levels.detach()
    limit = torch.finfo(check_level_dtype(level_dtype)).max
    if levels.numel() == 0:
        return
    lo, hi = torch.aminmax(levels)
    if -limit <= float(lo) and float(hi) <= limit:
        return
    finite = torch.isfinite(levels)
    largest = float(levels[finite].abs().max()) if bool(finite.any()) else float("nan")
    bad_rows = int((~(levels.abs() <= limit)).reshape(len(levels), -1).any(1).sum())
    raise LevelRangeError(f"levels of {bad_rows} of {len(levels)} rows do not fit {level_dtype} "
                          f"(|level| <= {limit:g}): {int((~finite).sum())} not finite, largest finite |level| "
                          f"{largest:.4g}")


_RAW = {torch.float16: torch.int16, torch.float8_e4m3fn: torch.uint8}


def round_levels(levels: torch.Tensor, level_dtype: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Levels as they come back from storage in `level_dtype`, as float32; a LevelRangeError for
    levels it cannot hold. With a generator the rounding is stochastic: to one of the two storage
    values around each level, with probabilities that make it unbiased, so steps smaller than the
    storage resolution move the stored levels in expectation instead of being rounded away."""
    check_levels(levels, level_dtype)
    dtype = check_level_dtype(level_dtype)
    x = levels.detach().float()
    stored = x.to(dtype)
    nearest = stored.float()
    if generator is None or dtype == torch.float32:
        return nearest
    # the storage value on x's other side: one step of the raw bits (sign-magnitude: +1 is away from 0)
    raw = stored.view(_RAW[dtype]).to(torch.int32)
    away = (x.abs() > nearest.abs()).to(torch.int32)
    sign_bit = 1 << (8 * stored.element_size() - 1)
    other_raw = torch.where(nearest == 0, torch.where(x < 0, sign_bit | 1, 1), raw + 2 * away - 1)
    other = other_raw.to(_RAW[dtype]).view(dtype).float()
    gap = (other - nearest).abs()
    p_other = torch.where(gap > 0, (x - nearest).abs() / gap, torch.zeros_like(x))
    take = torch.rand(x.shape, generator=generator) < p_other
    return torch.where(take & (x != nearest), other, nearest)


# the codes a byte holds at 1, 2, 4 and 8 bits, lowest bits first: byte value -> 8 / bits codes
_BYTE_CODES = {bits: ((np.arange(256)[:, None] >> (np.arange(8 // bits) * bits)) & ((1 << bits) - 1)).astype(np.uint8)
               for bits in (1, 2, 4, 8)}


def pack_rows(codes: np.ndarray, levels: torch.Tensor, bits: int, level_dtype: str) -> np.ndarray:
    """Pack (N, D) codes and (N, 2^n) levels into an (N, row_bytes) uint8 array."""
    check_bits(bits)
    codes = np.asarray(codes, dtype=np.uint8)
    n, dim = codes.shape
    if levels.shape != (n, 1 << bits):
        raise ValueError(f"levels shape {tuple(levels.shape)} does not match {n} nodes at {bits} bits")
    if codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(f"codes exceed {bits} bits")
    check_levels(levels, level_dtype)
    if bits in _BYTE_CODES:  # codes never straddle a byte: OR each byte's codes in (~15x faster than bit planes)
        per, cb = 8 // bits, code_bytes(dim, bits)
        padded = np.zeros((n, cb * per), dtype=np.uint8)
        padded[:, :dim] = codes
        by_byte = padded.reshape(n, cb, per)
        packed_codes = by_byte[:, :, 0].copy()
        for k in range(1, per):
            packed_codes |= by_byte[:, :, k] << (k * bits)
    else:
        bit_planes = (codes[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1
        packed_codes = np.packbits(bit_planes.reshape(n, dim * bits), axis=1, bitorder="little")
    stored = levels.detach().to(check_level_dtype(level_dtype)).contiguous()
    level_raw = stored.view(torch.uint8).numpy().reshape(n, level_bytes(bits, level_dtype))  # little-endian hosts
    return np.concatenate([packed_codes, level_raw], axis=1)


def quantize_rows(embeddings: torch.Tensor, bits: int, level_dtype: str) -> np.ndarray:
    """Packed rows of float embeddings, quantized node-wise as GNAQ initialises a node (serving rows)."""
    levels, codes = init_from_embedding(embeddings, bits)
    return pack_rows(codes.numpy(), round_levels(levels, level_dtype), bits, level_dtype)


def unpack_rows(rows: np.ndarray, dim: int, bits: int, level_dtype: str) -> tuple[np.ndarray, torch.Tensor]:
    """Inverse of `pack_rows`: (N, D) uint8 codes and (N, 2^n) float32 levels."""
    check_bits(bits)
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    n = rows.shape[0]
    cb = code_bytes(dim, bits)
    if rows.shape[1] != row_bytes(dim, bits, level_dtype):
        raise ValueError(f"row of {rows.shape[1]} bytes, expected {row_bytes(dim, bits, level_dtype)}")
    if n == 0:  # (a view of no bytes as wider levels is refused)
        return np.zeros((0, dim), dtype=np.uint8), torch.zeros(0, 1 << bits)
    if bits in _BYTE_CODES:  # codes never straddle a byte: one table lookup per byte
        codes = np.ascontiguousarray(_BYTE_CODES[bits][rows[:, :cb]].reshape(n, cb * 8 // bits)[:, :dim])
    else:
        bit_planes = np.unpackbits(rows[:, :cb], axis=1, bitorder="little")[:, : dim * bits].reshape(n, dim, bits)
        codes = bit_planes[:, :, 0].copy()
        for b in range(1, bits):  # one pass per bit: a sum over the short last axis was ~10x slower
            codes |= bit_planes[:, :, b] << b
    level_raw = torch.from_numpy(rows[:, cb:].copy())
    levels = level_raw.view(check_level_dtype(level_dtype)).reshape(n, 1 << bits).to(torch.float32)
    return codes, levels


@dataclass(frozen=True)
class ModelSize:
    """Exact storage of a quantized embedding table against float32 embeddings."""

    n_nodes: int
    bytes_per_node: int
    bytes_model: int
    bytes_fp32: int

    @property
    def compression(self) -> float:
        return self.bytes_fp32 / self.bytes_model if self.bytes_model else float("nan")


def model_size(n_nodes: int, dim: int, bits: int | None, level_dtype: str) -> ModelSize:
    """Bytes per node and in total; `bits=None` means a full-precision float32 table."""
    per_node = dim * 4 if bits is None else row_bytes(dim, bits, level_dtype)
    return ModelSize(n_nodes, per_node, n_nodes * per_node, n_nodes * dim * 4)
