import sys

import numpy as np
import pytest
import torch

from gnaq_stream.quant.packing import SUPPORTED_BITS, quantize_rows, unpack_rows
from gnaq_stream.quant.quantizer import dequantize, init_from_embedding
from gnaq_stream.serve.scoring import ItemIndex, PackedScorer, compiled_kernel_serves, top_k


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
    flags = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
    return " avx512f" in flags and " avx512bw" in flags


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("level_dtype", ["fp8", "fp16", "fp32"])
@pytest.mark.parametrize("dim", [8, 64, 96, 256])
def test_item_index_top_k_is_the_exact_top_k(dim, level_dtype, compiled):
    # on a machine like CI's the compiled kernel must be the one serving, not a silent fallback
    assert compiled_kernel_serves(dim, 2) == _cpu_has_avx512()
    if compiled and not _cpu_has_avx512():
        pytest.skip("the compiled kernel needs AVX-512 (F and BW); the numba case covers this CPU")
    torch.manual_seed(dim)
    n = 1000  # 15 whole blocks of 64 and a partial one
    emb = torch.randn(n, dim) * torch.logspace(-3, 1, n)[:, None]  # fp8 subnormal levels included
    rows = quantize_rows(emb, 2, level_dtype)
    codes, levels = unpack_rows(rows, dim, 2, level_dtype)
    items = dequantize(levels, torch.from_numpy(codes)).numpy()
    index = ItemIndex(dim, 2, level_dtype, compiled=compiled)
    order = np.random.default_rng(0).permutation(n)
    index.put(order[:500], rows[order[:500]])  # any order; the table grows as it goes
    index.put(order[500:], np.zeros((n - 500, rows.shape[1]), np.uint8))
    index.put(order[500:], rows[order[500:]])  # overwritten in place
    assert index.n == n and index.nbytes == rows.nbytes
    rng = np.random.default_rng(1)
    for k in (1, 20, 200):
        user = torch.randn(dim).numpy()
        exclude = rng.integers(0, n + 50, 40)  # indices beyond n are harmless
        best, values = index.top_k(user, k, exclude)
        truth = items @ user
        allowed = np.setdiff1d(np.arange(n), exclude)
        expected = np.sort(truth[allowed])[::-1][:k]
        assert len(best) == k and not np.isin(best, exclude).any() and len(set(best.tolist())) == k
        np.testing.assert_allclose(values, truth[best], rtol=1e-4, atol=1e-4)  # each score is its item's
        np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-4)  # and they are the k best
    best, _ = index.top_k(torch.randn(dim).numpy(), n, np.arange(0, n, 2))  # fewer items left than k
    assert sorted(best.tolist()) == list(range(1, n, 2))


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
