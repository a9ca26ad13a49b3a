import torch

from gnaq_stream.model.losses import bpr_loss, lambda_loss


def _grads(loss_fn):
    pos = torch.tensor([0.2, -0.1], requires_grad=True)
    neg = torch.tensor([[0.5, 0.0], [-0.3, 0.4]], requires_grad=True)
    loss_fn(pos, neg).backward()
    return pos.grad, neg.grad


def test_bpr_pushes_positive_up_and_negatives_down():
    g_pos, g_neg = _grads(bpr_loss)
    assert (g_pos < 0).all() and (g_neg > 0).all()


def test_lambda_loss_gradient_signs():
    g_pos, g_neg = _grads(lambda_loss)
    assert (g_pos < 0).all() and (g_neg >= 0).all()


def test_lambda_loss_weights_pairs_by_ndcg_change():
    pos = torch.tensor([0.0])
    neg = torch.tensor([[1.0, -1.0]])  # ranks: neg0=1, pos=2, neg1=3
    d_pos, d0, d1 = 1 / torch.log2(torch.tensor([3.0, 2.0, 4.0]))
    expected = (d_pos - d0).abs() * torch.nn.functional.softplus(torch.tensor(1.0)) \
        + (d_pos - d1).abs() * torch.nn.functional.softplus(torch.tensor(-1.0))
    torch.testing.assert_close(lambda_loss(pos, neg), expected)


def test_bpr_value():
    torch.testing.assert_close(bpr_loss(torch.tensor([0.0]), torch.tensor([[0.0]])), torch.log(torch.tensor(2.0)))
