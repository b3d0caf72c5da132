"""losses.py: each loss against a hand-computed value."""
import math

import torch
import torch.nn.functional as F

import losses


def test_eq1_diffusion_loss_is_mse():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    assert math.isclose(losses.diffusion_loss(pred, target).item(), (1 + 0 + 4 + 16) / 4)
    assert losses.diffusion_loss(pred.half(), target.half()).dtype == torch.float32


def test_eq4_embedding_l2_is_batch_mean_squared_norm():
    v = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert math.isclose(losses.embedding_l2(v).item(), (25 + 1) / 2)


def test_hyperweight_l2_equals_explicit_frobenius_norm_of_AB():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 40, 4, generator=g), torch.randn(3, 4, 24, generator=g)
    explicit = (A @ B).pow(2).sum(dim=(1, 2)).mean()
    assert torch.allclose(losses.hyperweight_l2(A, B), explicit, rtol=1e-5)
    assert losses.hyperweight_l2(A, torch.zeros_like(B)).item() == 0.0


def test_anchor_l2_sums_squared_distances():
    v, v0 = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    A, A0 = torch.ones(2, 2), torch.zeros(2, 2)
    assert math.isclose(losses.anchor_l2([v, A], [v0, A0]).item(), 5.0 + 4.0)


def test_eq3_contrastive_loss_matches_hand_computation():
    # A 5-token table in 2-D; two predicted embeddings.
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.7, 0.7]])
    v = torch.tensor([[2.0, 0.2], [0.1, -3.0]])
    tau, k = 0.5, 2
    got = losses.nn_contrastive_loss(v, table, k=k, tau=tau, exclude_ids=())
    vn, tn = F.normalize(v, dim=-1), F.normalize(table, dim=-1)
    expected = 0.0
    for i in range(2):
        sims = tn @ vn[i]
        pos = sims.topk(k).values / tau  # the k nearest tokens
        neg = (vn[1 - i] @ vn[i]) / tau  # the other image's embedding
        num = torch.exp(pos).sum()
        expected += -torch.log(num / (num + torch.exp(neg)))
    assert torch.allclose(got, expected / 2, atol=1e-6)


def test_eq3_gradient_pulls_toward_nearest_tokens_and_away_from_other_images():
    torch.manual_seed(0)
    table = F.normalize(torch.randn(50, 8), dim=-1)
    v = (table[:4] + 0.8 * torch.randn(4, 8)).requires_grad_(True)
    extra = torch.randn(6, 8)
    nn_ids, _ = losses.nearest_tokens(v, table, k=3, exclude=())

    def cos_to_nn(x):
        return F.cosine_similarity(x[:, None, :], table[nn_ids], dim=-1).mean().item()

    def cos_between(x):
        xn = F.normalize(x, dim=-1)
        sim = xn @ xn.T
        return (sim.sum() - sim.diagonal().sum()).item() / (x.shape[0] * (x.shape[0] - 1))

    loss = losses.nn_contrastive_loss(v, table, k=3, tau=0.1, extra_negatives=extra, exclude_ids=())
    loss.backward()
    stepped = (v - 0.05 * v.grad).detach()
    assert cos_to_nn(stepped) > cos_to_nn(v.detach())  # toward the nearest tokens
    assert cos_between(stepped) < cos_between(v.detach())  # away from each other
    assert losses.nn_contrastive_loss(stepped, table, k=3, tau=0.1, extra_negatives=extra, exclude_ids=()) < loss
