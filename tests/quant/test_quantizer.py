import pytest
import torch

from gnaq_stream.errors import ConfigError
from gnaq_stream.quant.quantizer import (dequantize, init_from_embedding, nearest_codes, neighbour_trust, rau_codes,
                                        rebin_codes)


def test_init_levels_and_codes_by_hand():
    emb = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 0.9]])
    levels, codes = init_from_embedding(emb, 2, "centre")
    # [0, 4] in 4 intervals of width 1; levels at the interval centres
    torch.testing.assert_close(levels, torch.tensor([[0.5, 1.5, 2.5, 3.5]]))
    assert codes.tolist() == [[0, 1, 2, 3, 3, 0]]
    torch.testing.assert_close(dequantize(levels, codes), torch.tensor([[0.5, 1.5, 2.5, 3.5, 3.5, 0.5]]))
    # the same codes; levels at the mean of each interval's values: (0 + 0.9) / 2, 1, 2, (3 + 4) / 2
    levels, mean_codes = init_from_embedding(emb, 2)
    torch.testing.assert_close(levels, torch.tensor([[0.45, 1.0, 2.0, 3.5]]))
    assert mean_codes.tolist() == codes.tolist()


def test_one_bit_init():
    levels, codes = init_from_embedding(torch.tensor([[-2.0, 2.0, 0.5]]), 1, "centre")
    torch.testing.assert_close(levels, torch.tensor([[-1.0, 1.0]]))
    assert codes.tolist() == [[0, 1, 1]]
    levels, _ = init_from_embedding(torch.tensor([[-2.0, 2.0, 0.5]]), 1)
    torch.testing.assert_close(levels, torch.tensor([[-2.0, 1.25]]))


def test_empty_interval_keeps_its_centre():
    levels, codes = init_from_embedding(torch.tensor([[0.0, 4.0, 3.9]]), 2)
    torch.testing.assert_close(levels, torch.tensor([[0.0, 1.5, 2.5, 3.95]]))
    with pytest.raises(ConfigError, match="level_init"):
        init_from_embedding(torch.ones(1, 2), 2, "median")


def test_constant_row_gets_code_zero():
    assert rebin_codes(torch.ones(1, 3), 2).tolist() == [[0, 0, 0]]


def test_nearest_codes_with_unsorted_levels():
    levels = torch.tensor([[3.0, -1.0, 1.0]])
    target = torch.tensor([[2.9, -5.0, 0.8, 1.9]])
    assert nearest_codes(target, levels).tolist() == [[0, 1, 2, 2]]  # 1.9 is nearer 1.0 than 3.0


@pytest.mark.parametrize("bits", [1, 2, 4, 5, 8])  # midpoint counting up to 16 levels, searchsorted above
def test_nearest_codes_match_a_brute_force_argmin(bits):
    gen = torch.Generator().manual_seed(bits)
    levels = torch.randn(50, 1 << bits, generator=gen)
    target = torch.randn(50, 32, generator=gen) * 2
    distance = (target.unsqueeze(-1) - levels.unsqueeze(1)).abs()
    assert nearest_codes(target, levels).long().tolist() == distance.argmin(-1).tolist()


def test_rau_moves_codes_only_through_aggregation():
    levels = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 2)
    codes = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]], dtype=torch.uint8)
    latent = dequantize(levels, codes)
    # node 0 has neighbours whose aggregate is reversed; node 1 has none (zero aggregate)
    aggregate = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    degree = torch.tensor([4, 0])
    assert rau_codes(latent, aggregate, levels, neighbour_trust(degree, 0.0, 10.0)).tolist() == codes.tolist()
    moved = rau_codes(latent, aggregate, levels, neighbour_trust(degree, 1.0, 1e9))
    assert moved.tolist() == [[3, 2, 1, 0], [0, 1, 2, 3]]


def test_rau_rescales_the_aggregate_to_the_node():
    levels = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    latent = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    aggregate = torch.tensor([[0.0, 10.0, 20.0, 30.0]])  # same direction, 10x the scale
    assert rau_codes(latent, aggregate, levels, torch.tensor([1.0])).tolist() == [[0, 1, 2, 3]]


def test_neighbour_trust_falls_with_degree():
    trust = neighbour_trust(torch.tensor([0, 1, 10, 1000]), 0.5, 10.0)
    assert trust[0] == 0.0
    assert trust[1] == pytest.approx(0.5 * 10 / 11)
    assert trust[2] == pytest.approx(0.25)
    assert trust[3] < 0.01
    flat = neighbour_trust(torch.tensor([0, 1, 1000]), 0.25, 0.0)
    assert flat.tolist() == [0.0, 0.25, 0.25]
