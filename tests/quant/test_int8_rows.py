import torch

from gnaq_stream.quant.int8_rows import Int8Rows


def test_refinement_context_is_held_as_int8_rows_within_their_rounding():
    rows = torch.tensor([[0.5, -0.25, 0.0], [-3.0, 1.0, 2.9], [0.0, 0.0, 0.0]])
    held = Int8Rows(rows)
    assert held.nbytes == 3 * (3 + 4) and held.values.dtype == torch.int8  # a byte a value, a float32 scale a row
    got = held.rows(torch.tensor([1, 0, 2]))
    assert ((got - rows[[1, 0, 2]]).abs() <= rows[[1, 0, 2]].abs().amax(1, keepdim=True) / 254 + 1e-7).all()
    assert got[0, 0] == -3.0 and torch.equal(got[2], torch.zeros(3))  # a row's largest value is exact
    # quantised chunk by chunk: rows past the first chunk get their own scale the same way
    many = torch.randn(2 * Int8Rows.CHUNK + 5, 3, generator=torch.Generator().manual_seed(0))
    held = Int8Rows(many)
    assert torch.equal(held.scale, many.abs().amax(1) / 127)
    assert ((held.rows(torch.arange(len(many))) - many).abs() <= held.scale[:, None] / 2 + 1e-6).all()
    # rows rewritten in place get a scale of their own; growing keeps what is held and adds zero rows
    new = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.25]])
    held.write(torch.tensor([0, 2]), new)
    assert held.scale[0] == 2.0 / 127 and held.scale[2] == 0.25 / 127
    assert ((held.rows(torch.tensor([0, 2])) - new).abs() <= new.abs().amax(1, keepdim=True) / 254 + 1e-7).all()
    kept = held.rows(torch.arange(len(many)))
    held.grow(len(many) + 3)
    assert len(held) == len(many) + 3 and torch.equal(held.rows(torch.arange(len(many))), kept)
    assert torch.equal(held.rows(torch.arange(len(many), len(many) + 3)), torch.zeros(3, 3))
