"""
losses.py -- one pure function per loss term of the paper.

    diffusion_loss        Eq. (1)   ||eps - eps_theta(z_t, t, y)||^2
    nn_contrastive_loss   Eq. (3)   nearest-neighbour contrastive regulariser on v*
    nearest_cosine_loss   Sec. 5.2  VQGAN-codebook-style ablation: cosine distance to the nearest token
    embedding_l2          Eq. (4)   ||v*||^2
    hyperweight_l2        Sec. 4.1  L2 on the predicted weight offsets Delta W = A B
    anchor_l2             Sec. 4.4  keep the tuned v, A, B close to the encoder's prediction

All take batched tensors and return a scalar (batch mean where a batch exists).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model import SPECIAL_IDS, nearest_tokens


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. (1): mean squared error between the UNet's prediction and the noise, in fp32."""
    return F.mse_loss(pred.float(), target.float())  # Eq. (1)


def nn_contrastive_loss(
    v: torch.Tensor,
    token_table: torch.Tensor,
    k: int = 5,
    tau: float = 0.07,
    extra_negatives: torch.Tensor | None = None,
    exclude_ids=SPECIAL_IDS,
) -> torch.Tensor:
    """Eq. (3): pull each v* toward its k nearest real tokens, push it away from other images' v'.

    v (N, D): predicted embeddings of the batch. token_table (V, D): frozen token embeddings.
    Positives N(v*) = the k rows of the table nearest to v* in cosine (special tokens excluded;
    the search carries no gradient). Negatives = the other rows of v, plus `extra_negatives`
    (M, D), e.g. the v' gathered from the other ranks under DDP.

    NOTE: the dot products v*.T_i and v*.v' are taken on L2-normalised vectors (cosines).
    The paper writes a plain dot product; we normalise because N(v*) is defined by cosine
    distance, because the token table's norms vary from row to row (raw dot products would
    favour long rows over near ones), and because Eq. (4) shrinks ||v*|| during training,
    which would silently change the effective temperature tau of raw dot products.
    """
    nn_ids, _ = nearest_tokens(v, token_table, k=k, exclude=exclude_ids)  # (N, k), no grad
    table = F.normalize(token_table.detach().float(), dim=-1)  # (V, D)
    vn = F.normalize(v.float(), dim=-1)  # (N, D)
    pos = (vn[:, None, :] * table[nn_ids]).sum(-1) / tau  # (N, k)   v*.T_i / tau
    negs = vn if extra_negatives is None else torch.cat([vn, F.normalize(extra_negatives.float(), dim=-1)])
    neg = vn @ negs.T / tau  # (N, N+M)   v*.v' / tau
    n = v.shape[0]
    self_mask = torch.zeros_like(neg, dtype=torch.bool)
    self_mask[torch.arange(n), torch.arange(n)] = True  # v' != v*: drop each row's own entry
    neg = neg.masked_fill(self_mask, -float("inf"))
    # Eq. (3): -log( sum_pos exp / (sum_pos exp + sum_neg exp) ), in log-sum-exp form.
    loss = torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1) - torch.logsumexp(pos, dim=1)  # (N,)
    return loss.mean()


def nearest_cosine_loss(v: torch.Tensor, token_table: torch.Tensor, exclude_ids=SPECIAL_IDS) -> torch.Tensor:
    """Sec. 5.2 (Fig. 4, "nearest-neighbour"): 1 - cos(v*, T_nn), T_nn the nearest real token.

    The regulariser Sec. 5.2 compares Eq. (3) against, "inspired by the code-book losses of
    VQGAN": it pulls v* toward its nearest token but, having no negatives, does nothing to keep
    different images' v* apart. The table is frozen, so only VQGAN's commitment half remains.
    v (N, D); the search carries no gradient. Batch mean.
    """
    nn_ids, _ = nearest_tokens(v, token_table, k=1, exclude=exclude_ids)  # (N, 1), no grad
    nearest = token_table.detach().float()[nn_ids[:, 0]]  # (N, D)
    return (1 - F.cosine_similarity(v.float(), nearest, dim=-1)).mean()


def embedding_l2(v: torch.Tensor) -> torch.Tensor:
    """Eq. (4): ||v*||^2, averaged over the batch. v (N, D)."""
    return v.float().pow(2).sum(-1).mean()  # Eq. (4)


def hyperweight_l2(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Sec. 4.1: ||A B||_F^2 for one layer, averaged over the batch, without forming A B.

    A (N, D_in, r), B (N, r, D_out).  ||AB||_F^2 = tr(B^T A^T A B) = sum((A^T A) * (B B^T)),
    an r x r computation instead of D_in x D_out (both Gram matrices are symmetric).
    """
    A, B = A.float(), B.float()
    gram_a = A.transpose(1, 2) @ A  # (N, r, r)
    gram_b = B @ B.transpose(1, 2)  # (N, r, r)
    return (gram_a * gram_b).sum(dim=(1, 2)).mean()  # Sec. 4.1: ||Delta W||^2


def anchor_l2(tensors, anchors) -> torch.Tensor:
    """Sec. 4.4: sum of ||x - x0||^2 over matching tensors (v, every A, every B).

    tensors / anchors: equal-length iterables, e.g. [v, A_1, B_1, ...] and the encoder's
    prediction [v0, A0_1, B0_1, ...]; anchors carry no gradient.
    """
    total = None
    for x, x0 in zip(tensors, anchors, strict=True):
        term = (x.float() - x0.detach().float()).pow(2).sum()
        total = term if total is None else total + term
    return total
