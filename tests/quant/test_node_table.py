import numpy as np
import torch

from gnaq_stream.quant import node_table
from gnaq_stream.quant.node_table import MEAN_SAMPLE, NodeTable
from gnaq_stream.quant.packing import pack_rows, round_levels, row_bytes
from gnaq_stream.quant.quantizer import dequantize, init_from_embedding


def test_a_table_holds_its_nodes_as_stored_rows(monkeypatch):
    monkeypatch.setattr(node_table, "CHUNK", 7)  # whole-table reads go chunk by chunk
    gen = torch.Generator().manual_seed(0)
    table = NodeTable(dim=12, bits=2, level_dtype="fp8", capacity=4)
    first, second = torch.randn(10, 12, generator=gen), torch.randn(9, 12, generator=gen)
    table.append(first, version=1)
    table.append(second, version=2)  # grows past its capacity twice
    x = torch.cat([first, second])
    levels, codes = init_from_embedding(x, 2)
    levels = round_levels(levels, "fp8")
    assert table.n == 19 and table.version[:19].tolist() == [1] * 10 + [2] * 9
    # the held row is the stored one, byte for byte: memory equals what is stored
    assert np.array_equal(table.packed(np.arange(19)), pack_rows(codes.numpy(), levels, 2, "fp8"))
    assert table.rows.shape[1] == row_bytes(12, 2, "fp8") == 7
    assert table.nbytes == len(table.rows) * (7 + (12 + 4) + 8)  # row, int8 latent difference + scale, version
    got_levels, got_codes = table.levels_codes(np.array([18, 3]))
    assert torch.equal(got_codes, codes[[18, 3]]) and torch.equal(got_levels, levels[[18, 3]])
    assert torch.equal(table.embeddings(), dequantize(levels, codes))
    # the float shadow, held as its difference from the dequantised row: error <= 1/254 of the largest
    difference = x - dequantize(levels, codes)
    bound = difference.abs().amax(1, keepdim=True) / 254 + 1e-6
    assert ((table.training_rows(np.arange(19))[2] - x).abs() <= bound).all()
    # a write replaces exactly these rows
    table.write(np.array([5]), levels[[0]], codes[[0]], table.training_rows(np.array([0]))[2])
    assert np.array_equal(table.packed(np.array([5, 6])), table.packed(np.array([0, 6])))
    torch.testing.assert_close(table.training_rows(np.array([5]))[2], table.training_rows(np.array([0]))[2])
    # loading packed rows: latent = dequantised rows, mean exact (fewer rows than its sample)
    back = NodeTable(dim=12, bits=2, level_dtype="fp8")
    back.load_rows(table.packed(np.arange(19)), np.arange(19))
    assert torch.equal(back.embeddings(), table.embeddings())
    assert torch.equal(back.training_rows(np.arange(19))[2], back.embeddings())
    torch.testing.assert_close(back.mean, back.embeddings().mean(0))


def test_a_large_tables_prior_mean_is_estimated_from_a_sample_on_load():
    table = NodeTable(dim=8, bits=2, level_dtype="fp8")
    x = torch.randn(3 * MEAN_SAMPLE, 8, generator=torch.Generator().manual_seed(0)) + torch.arange(8.0)
    table.append(x, 0)
    back = NodeTable(dim=8, bits=2, level_dtype="fp8")
    back.load_rows(table.packed(np.arange(3 * MEAN_SAMPLE)), np.zeros(3 * MEAN_SAMPLE, dtype=np.int64))
    exact = back.embeddings().mean(0)
    assert not torch.equal(back.mean, exact)  # a sample's mean...
    torch.testing.assert_close(back.mean, exact, atol=0.02, rtol=0)  # ...within its standard error (~0.004)
