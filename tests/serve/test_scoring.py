import sys

import numpy as np
import pytest
import torch

from gnaq_stream.quant.packing import SUPPORTED_BITS, unpack_rows
from gnaq_stream.quant.quantizer import dequantize, init_from_embedding
from gnaq_stream.serve.scoring import PackedScorer, quantize_rows, top_k


@pytest.mark.parametrize("level_dtype", ["fp8", "fp16", "fp32"])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_packed_scores_equal_dequantised_dot_products(bits, level_dtype):
    torch.manual_seed(bits)
    rows = quantize_rows(torch.randn(300, 20), bits, level_dtype)  # dim 20: a partly filled last byte
    codes, levels = unpack_rows(rows, 20, bits, level_dtype)
    items = dequantize(levels, torch.from_numpy(codes)).numpy()
    scorer = PackedScorer(20, bits, level_dtype)
    user = scorer.user_vector(rows[0])
    np.testing.assert_allclose(user, items[0])
    np.testing.assert_allclose(scorer.scores(user, rows, 250), items[:250] @ user, rtol=1e-4, atol=1e-4)


def _cpu_has_avx512() -> bool:
    return " avx512f" in open("/proc/cpuinfo").read() if sys.platform == "linux" else False


@pytest.mark.parametrize("level_dtype", ["fp8", "fp16", "fp32"])
@pytest.mark.parametrize("dim", [32, 64, 96])
def test_compiled_kernel_scores_equal_dequantised_dot_products(dim, level_dtype):
    torch.manual_seed(dim)
    emb = torch.randn(300, dim) * torch.logspace(-3, 1, 300)[:, None]  # fp8 subnormal levels included
    rows = quantize_rows(emb, 2, level_dtype)
    codes, levels = unpack_rows(rows, dim, 2, level_dtype)
    items = dequantize(levels, torch.from_numpy(codes)).numpy()
    scorer = PackedScorer(dim, 2, level_dtype)
    # on a machine like CI's the compiled kernel must be the one serving, not a silent fallback
    assert scorer.compiled == _cpu_has_avx512()
    user = torch.randn(dim).numpy()
    for n in (1, 15, 16, 17, 300):  # whole and partial blocks of 16 rows
        np.testing.assert_allclose(scorer.scores(user, rows, n), items[:n] @ user, rtol=1e-4, atol=1e-4)
    scorer.compiled = False  # the numba kernel agrees
    np.testing.assert_allclose(scorer.scores(user, rows, 300), items @ user, rtol=1e-4, atol=1e-4)


def test_quantize_rows_is_the_gnaq_node_initialisation():
    emb = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, -1.0, 1.0, 1.0]])
    codes, levels = unpack_rows(quantize_rows(emb, 2, "fp32"), 4, 2, "fp32")
    ref_levels, ref_codes = init_from_embedding(emb, 2)
    assert codes.tolist() == ref_codes.tolist() == [[0, 1, 2, 3], [0, 0, 3, 3]]
    torch.testing.assert_close(levels, ref_levels)


def test_top_k_orders_excludes_and_breaks_ties_by_index():
    scores = np.array([0.5, 2.0, 1.0, 2.0, -1.0, 3.0], dtype=np.float32)
    best, values = top_k(scores.copy(), 3, np.array([5]))
    assert best.tolist() == [1, 3, 2] and values.tolist() == [2.0, 2.0, 1.0]
    best, _ = top_k(scores.copy(), 10, np.array([0, 1, 99]))  # fewer candidates than k; 99 out of range
    assert best.tolist() == [5, 3, 2, 4]
