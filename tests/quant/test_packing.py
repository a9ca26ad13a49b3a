import numpy as np
import pytest
import torch

from gnaq_stream.errors import ConfigError
from gnaq_stream.quant.packing import (SUPPORTED_BITS, code_bytes, model_size, pack_rows, round_levels, row_bytes,
                                       unpack_rows)


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
