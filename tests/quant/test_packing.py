import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gnaq_stream.errors import ConfigError
from gnaq_stream.quant.packing import (LEVEL_DTYPES, SUPPORTED_BITS, LevelRangeError, check_row_format, code_bytes,
                                       model_size, pack_rows, round_levels, row_bytes, unpack_rows)

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("level_dtype", ["fp32", "fp16", "fp8"])
def test_round_trip_every_width(bits, level_dtype):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(7, 13), dtype=np.uint8)
    levels = torch.tensor([[0.5 * k - 1.0 for k in range(1 << bits)]] * 7)
    rows = pack_rows(codes, levels, bits, level_dtype)
    assert rows.shape == (7, row_bytes(13, bits, level_dtype))
    codes_back, levels_back = unpack_rows(rows, 13, bits, level_dtype)
    np.testing.assert_array_equal(codes_back, codes)
    torch.testing.assert_close(levels_back, round_levels(levels, level_dtype), rtol=0, atol=0)
    assert (levels_back - levels).abs().max() <= 0.0625 * levels.abs().max()  # e4m3: 3 mantissa bits
    assert pack_rows(codes[:0], levels[:0], bits, level_dtype).shape == (0, rows.shape[1])
    none_codes, none_levels = unpack_rows(rows[:0], 13, bits, level_dtype)
    assert none_codes.shape == (0, 13) and none_levels.shape == (0, 1 << bits)


def test_two_bit_layout_is_little_end_first():
    codes = np.array([[1, 2, 3, 0, 3]], dtype=np.uint8)
    rows = pack_rows(codes, torch.zeros(1, 4), 2, "fp16")
    # byte 0 = 1 | 2<<2 | 3<<4 | 0<<6 = 0b00111001; byte 1 holds code 4 in its low bits
    assert rows[0, 0] == 0b00111001
    assert rows[0, 1] == 3
    assert rows.shape[1] == 2 + 4 * 2


def test_three_bit_codes_cross_byte_boundaries():
    codes = np.array([[7, 0, 5]], dtype=np.uint8)  # bits 111 000 101 -> stream 111000101
    rows = pack_rows(codes, torch.zeros(1, 8), 3, "fp8")
    assert rows[0, 0] == 0b01000111
    assert rows[0, 1] == 0b1


def test_exact_byte_counts():
    assert code_bytes(64, 2) == 16
    assert row_bytes(64, 2, "fp8") == 20
    assert row_bytes(64, 2, "fp16") == 24
    assert row_bytes(64, 1, "fp8") == 10
    assert row_bytes(64, 3, "fp32") == 24 + 32
    assert row_bytes(64, 8, "fp16") == 64 + 512
    size = model_size(1000, 64, 2, "fp8")
    assert (size.bytes_model, size.bytes_fp32) == (20_000, 256_000)
    assert size.compression == pytest.approx(12.8)
    assert model_size(10, 64, None, "fp32").compression == 1.0


def test_bad_bits_and_codes_rejected():
    with pytest.raises(ConfigError):
        pack_rows(np.zeros((1, 4), np.uint8), torch.zeros(1, 32), 5, "fp8")
    with pytest.raises(ValueError):
        pack_rows(np.full((1, 4), 4, np.uint8), torch.zeros(1, 4), 2, "fp8")
    with pytest.raises(ValueError):
        unpack_rows(np.zeros((1, 3), np.uint8), 64, 2, "fp8")


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("level_dtype", list(LEVEL_DTYPES))
@pytest.mark.parametrize("dim", [1, 4, 16, 64, 85, 86, 128, 512])
def test_a_row_format_is_accepted_only_when_smaller_than_fp32(bits, level_dtype, dim):
    size = row_bytes(dim, bits, level_dtype)
    if size < 4 * dim:
        assert check_row_format(dim, bits, level_dtype) == size
    else:
        with pytest.raises(ConfigError, match=f"take {size} bytes per node at dim {dim}, not less than float32's "
                                              f"{4 * dim}"):
            check_row_format(dim, bits, level_dtype)


def test_eight_bits_needs_a_wide_enough_row():
    with pytest.raises(ConfigError, match=r"8 bits with fp8 levels take 320 bytes .* \(or dim >= 86\)"):
        check_row_format(64, 8, "fp8")
    assert check_row_format(86, 8, "fp8") == 86 + 256 < 4 * 86


def _bytes_table(dim: int) -> str:
    """The README's table of bytes per node, from row_bytes (compression against float32 in brackets)."""
    lines = ["| bits | " + " | ".join(f"{name} levels" for name in LEVEL_DTYPES) + " |",
             "|---" * (len(LEVEL_DTYPES) + 1) + "|"]
    for bits in SUPPORTED_BITS:
        cells = []
        for name in LEVEL_DTYPES:
            size = row_bytes(dim, bits, name)
            smallest = next(d for d in itertools.count(1) if row_bytes(d, bits, name) < 4 * d)
            fits = size < 4 * dim
            cells.append(f"{size} ({4 * dim / size:.1f}x)" if fits else f"{size}: refused below dim {smallest}")
        lines.append(f"| {bits} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_readme_lists_the_bytes_per_node_of_every_combination():
    expected = _bytes_table(64)
    readme = README.read_text()
    assert expected in readme, f"README's bytes-per-node table is not what row_bytes gives; it should read:\n{expected}"


@pytest.mark.parametrize("level_dtype,limit", [("fp8", 448.0), ("fp16", 65504.0)])
def test_levels_beyond_the_dtype_are_an_error_not_a_saturated_value(level_dtype, limit):
    codes = np.zeros((3, 4), np.uint8)
    levels = torch.tensor([[-limit, 0.0, 1.0, limit]] * 3)
    unpacked = unpack_rows(pack_rows(codes, levels, 2, level_dtype), 4, 2, level_dtype)[1]
    torch.testing.assert_close(unpacked, levels, rtol=0, atol=0)  # the limit itself is held exactly
    levels[1, 2] = -1.5 * limit
    levels[2, 0] = 2 * limit
    message = re.escape(f"levels of 2 of 3 rows do not fit {level_dtype} (|level| <= {limit:g}): 0 not finite, "
                        f"largest finite |level| {2 * limit:.4g}")
    with pytest.raises(LevelRangeError, match=message):
        pack_rows(codes, levels, 2, level_dtype)
    with pytest.raises(LevelRangeError, match=message):
        round_levels(levels, level_dtype)


@pytest.mark.parametrize("level_dtype", list(LEVEL_DTYPES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_levels_are_an_error(level_dtype, bad):
    levels = torch.zeros(2, 4)
    levels[0, 1] = bad
    with pytest.raises(LevelRangeError, match="levels of 1 of 2 rows .*: 1 not finite, largest finite .level. 0"):
        pack_rows(np.zeros((2, 3), np.uint8), levels, 2, level_dtype)
    with pytest.raises(ValueError):  # a ValueError like every other malformed input of pack_rows
        round_levels(levels, level_dtype)


@pytest.mark.parametrize("level_dtype", ["fp8", "fp16"])
def test_stochastic_rounding_is_unbiased_and_lands_on_the_two_storage_values_around(level_dtype):
    values = torch.tensor([0.1, -0.1, 0.3001, -3.3, 1e-5, -1e-5, 0.0, 1.0, 200.0])
    levels = values.repeat(40_000, 1)
    rounded = round_levels(levels, level_dtype, torch.Generator().manual_seed(0))
    assert torch.equal(round_levels(rounded, level_dtype), rounded)  # every value storable as is
    nearest = round_levels(values, level_dtype)
    for k, x in enumerate(values.tolist()):
        seen = sorted(set(rounded[:, k].tolist()))
        assert len(seen) <= 2 and nearest[k].item() in seen and min(seen) <= x <= max(seen)
        if len(seen) == 2:  # the mean is x, within the sampling error of 40,000 draws
            gap = seen[1] - seen[0]
            assert abs(rounded[:, k].mean().item() - x) < 5 * gap * 0.5 / 200
    # nearest rounding of the same values is biased wherever x is not storable
    assert (nearest != values).any()
