import sys

import numpy as np
import pytest
import torch

from gnaq_stream.quant.packing import SUPPORTED_BITS, quantize_rows, unpack_rows
from gnaq_stream.quant.quantizer import dequantize, init_from_embedding
from gnaq_stream.serve.scoring import ItemIndex, PackedScorer, _fastscan, compiled_kernel_serves, top_k


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


KERNELS = ("avx512", "avx2", "portable")


def _cpu_kernels() -> tuple[str, ...]:
    """The fast-scan kernels this CPU's flags say it runs, best first."""
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    needs = {"avx512": {"avx512f", "avx512bw"}, "avx2": {"avx2", "fma", "f16c"}, "portable": set()}
    return tuple(k for k in KERNELS if needs[k] <= flags)


@pytest.mark.skipif(sys.platform != "linux", reason="CPU flags read from /proc/cpuinfo")
def test_the_build_runs_every_kernel_this_cpu_has(monkeypatch):
    # a kernel the CPU has must be built and tested here, never silently skipped or left to numba
    assert _fastscan is not None, "the compiled fast scan was not built (no C compiler?)"
    assert _fastscan.KERNELS == _cpu_kernels()
    monkeypatch.delenv("GNAQ_FASTSCAN_KERNEL", raising=False)
    assert _fastscan.kernel() == _fastscan.KERNELS[0]
    assert ItemIndex(64, 2, "fp8").kernel == _fastscan.KERNELS[0]
    assert compiled_kernel_serves(64, 2) and compiled_kernel_serves(20, 2) and not compiled_kernel_serves(64, 4)


def _use(kernel: str, monkeypatch) -> bool:
    """Force a kernel for this test (skipped if this CPU lacks it); whether it is a compiled one."""
    if kernel != "numba":
        if _fastscan is None or kernel not in _fastscan.KERNELS:
            pytest.skip(f"this CPU cannot run the {kernel} kernel (no emulator here); the kernels it has run")
        monkeypatch.setenv("GNAQ_FASTSCAN_KERNEL", kernel)
        assert _fastscan.kernel() == kernel
    return kernel != "numba"


def _rows(dim: int, level_dtype: str, n: int, seed: int):
    torch.manual_seed(seed)
    emb = torch.randn(n, dim) * torch.logspace(-3, 1, n)[:, None]  # fp8 subnormal levels included
    rows = quantize_rows(emb, 2, level_dtype)
    codes, levels = unpack_rows(rows, dim, 2, level_dtype)
    return rows, dequantize(levels, torch.from_numpy(codes)).numpy()


@pytest.mark.parametrize("kernel", KERNELS + ("numba",))
@pytest.mark.parametrize("level_dtype", ["fp8", "fp16", "fp32"])
@pytest.mark.parametrize("dim", [8, 20, 64, 96, 256])
def test_item_index_top_k_is_the_exact_top_k(dim, level_dtype, kernel, monkeypatch):
    compiled = _use(kernel, monkeypatch)
    n = 1000  # 15 whole blocks of 64 and a partial one
    rows, items = _rows(dim, level_dtype, n, dim)
    index = ItemIndex(dim, 2, level_dtype, compiled=compiled)
    assert index.kernel == kernel
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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [1, 63, 65, 130])
def test_fast_scan_top_k_of_a_few_items(n, kernel, monkeypatch):
    _use(kernel, monkeypatch)
    rows, items = _rows(16, "fp8", n, n)
    index = ItemIndex(16, 2, "fp8")
    index.put(np.arange(n), rows)
    user = torch.randn(16).numpy()
    best, values = index.top_k(user, 5, np.array([n - 1]))  # the last item, in a partial block, masked
    truth = items @ user
    expected = np.sort(truth[:n - 1])[::-1][:5]
    assert len(best) == min(5, n - 1) and (n - 1) not in best.tolist()
    np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("level_dtype", ["fp8", "fp32"])
def test_every_kernel_gives_the_same_answer(level_dtype, monkeypatch):
    # the kernels compute the same integer sums, and the rerank is shared: identical results
    n, dim = 3000, 64
    rows, _ = _rows(dim, level_dtype, n, 7)
    index = ItemIndex(dim, 2, level_dtype)
    index.put(np.arange(n), rows)
    users = np.random.default_rng(2).standard_normal((20, dim)).astype(np.float32)
    exclude = np.arange(0, n, 7)
    answers = {}
    for kernel in _fastscan.KERNELS:
        monkeypatch.setenv("GNAQ_FASTSCAN_KERNEL", kernel)
        answers[kernel] = [index.top_k(u, 50, exclude) for u in users]
    for kernel, results in answers.items():
        for (best, values), (best_p, values_p) in zip(results, answers["portable"]):
            assert best.tolist() == best_p.tolist() and values.tolist() == values_p.tolist(), kernel


def test_forcing_a_kernel_this_cpu_cannot_run_is_a_clear_error(monkeypatch):
    index = ItemIndex(8, 2, "fp8")
    index.put(np.arange(3), quantize_rows(torch.randn(3, 8), 2, "fp8"))
    monkeypatch.setenv("GNAQ_FASTSCAN_KERNEL", "neon")
    with pytest.raises(ValueError, match="GNAQ_FASTSCAN_KERNEL=neon: not one of avx512, avx2, portable"):
        index.top_k(np.ones(8, np.float32), 2, np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="not one of"):
        _fastscan.kernel()
    missing = [k for k in KERNELS if k not in _fastscan.KERNELS]
    for kernel in missing:  # none on a CPU with AVX-512: every kernel runs there
        monkeypatch.setenv("GNAQ_FASTSCAN_KERNEL", kernel)
        with pytest.raises(ValueError, match=f"GNAQ_FASTSCAN_KERNEL={kernel} needs .*, which this CPU lacks"):
            index.top_k(np.ones(8, np.float32), 2, np.zeros(0, np.int64))
    monkeypatch.delenv("GNAQ_FASTSCAN_KERNEL")  # read at every call: back to the best one
    assert len(index.top_k(np.ones(8, np.float32), 2, np.zeros(0, np.int64))[0]) == 2


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
