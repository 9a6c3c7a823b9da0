"""Meta-learning heads on a contrastive task (Ni et al. 2022, "The Close Relationship Between Contrastive
Learning and Meta-Learning", MetaContrastive): every image of the global batch is one class; the first
``n_supp`` views of each image are its support set and the other ``n_query`` its queries. A head turns the
support set into a classifier, and the queries are classified over all the batch's classes.

* **PN** (Prototypical Networks, Snell et al. 2017): the prototype of an image is the mean of its support
  embeddings; a query's logit for a class is minus the squared Euclidean distance to its prototype.
* **R2D2** (Bertinetto et al. 2019): ridge regression from the support embeddings to one-hot labels,
  ``W = argmin ||SW - Y||^2 + lambda ||W||^2``; a query's logits are ``qW`` (no bias, no output scale).

Both use embeddings L2-normalised and divided by sqrt(temperature), so with one support view a PN logit is
``-(2 - 2 cos)/t = 2 cos/t - 2/t``: SimCLR's logit at temperature t/2, up to a per-query constant (the authors'
ProtoNet head does the same: a squared distance, not halved). The returned :class:`ContrastiveLogits` (positive
= the query's own class, negatives = every other class) feed the same reductions as SimCLR's logits: InfoNCE
is then the head's cross-entropy, FlatNCE its flat version.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.distributed import gather_with_grad, get_rank
from losses.infonce import ContrastiveLogits, at_least_fp32

HEADS = ("contrastive", "PN", "R2D2")


def task_embeddings(z: torch.Tensor, n_views: int, temperature: float) -> torch.Tensor:
    """``z`` (V*N, D), view-major, as (V, N, D) unit vectors divided by sqrt(temperature), in fp32 or wider."""
    v = F.normalize(at_least_fp32(z), dim=1) / temperature ** 0.5
    return v.view(n_views, -1, v.shape[1])


def prototype_logits(support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """PN: ``support`` (S, C, D) (S views of each of C classes), ``query`` (Q, D) -> (Q, C) logits, minus the
    squared distance of each query to each class's mean support embedding."""
    protos = support.mean(dim=0)  # (C, D)
    return 2 * query @ protos.T - query.pow(2).sum(1, keepdim=True) - protos.pow(2).sum(1)[None, :]


def ridge_weights(support: torch.Tensor, reg: float) -> torch.Tensor:
    """R2D2: ``support`` (S, C, D) -> the ridge regression weights W (D, C) of the support embeddings onto their
    one-hot class labels, with ridge ``reg``.

    Two equal forms (Woodbury): the dual ``W = X^T (X X^T + reg I)^-1 Y`` solves an (S*C)x(S*C) system, the
    primal ``W = (X^T X + reg I)^-1 X^T Y`` a DxD one, X (S*C, D) the support rows and Y their one-hot labels.
    The smaller is used: the primal once the support set is larger than the embedding width. At a global batch
    of 4096 with one support view and 128-d projections that is the primal: X^T X costs 4096*128^2 = 6.7e7
    multiply-adds and the 128x128 Cholesky solve is negligible, where the dual would hold a 4096x4096 kernel
    (64 MiB in fp32) and a 4096^3/3 = 2.3e10 flop factorisation. Solved in fp32 (at least) with a Cholesky
    factorisation of the symmetric positive definite system, never an explicit inverse.
    """
    s, c, d = support.shape
    x = support.reshape(s * c, d)
    with torch.autocast(device_type=support.device.type, enabled=False):
        x = at_least_fp32(x)
        if s * c > d:  # primal: X^T Y is the per-class sum of the support rows
            gram = x.T @ x + reg * torch.eye(d, dtype=x.dtype, device=x.device)
            xty = support.to(x.dtype).sum(dim=0).T  # (D, C)
            return torch.cholesky_solve(xty, _cholesky(gram))
        kernel = x @ x.T + reg * torch.eye(s * c, dtype=x.dtype, device=x.device)
        y = _one_hot_rows(s, c, x.device, x.dtype)  # (S*C, C)
        return x.T @ torch.cholesky_solve(y, _cholesky(kernel))


def _cholesky(a: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a Gram matrix plus ``reg`` * I (positive definite for reg > 0), without the
    error check of ``torch.linalg.cholesky``, which would make the GPU report to the host every step."""
    return torch.linalg.cholesky_ex(a, check_errors=False).L


def _one_hot_rows(s: int, c: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One-hot labels of support rows laid out view-major: row v*C + j is class j."""
    return torch.eye(c, dtype=dtype, device=device).repeat(s, 1)


def head_logits(head: str, z: torch.Tensor, n_supp: int, n_views: int, temperature: float,
                reg: float) -> ContrastiveLogits:
    """The task's query logits as positives/negatives.

    Args:
        head: "PN" or "R2D2".
        z: this rank's projections (V*N, D), view-major.
        n_supp: support views per image (the first ones); the other ``n_views - n_supp`` are queries.
    The classes are every rank's images: the support embeddings are gathered from all ranks with their gradient
    (rank r's images are classes r*N ... r*N+N-1); the queries stay local.
    Returns logits whose ``pos`` (Q*N, 1) is each query's own class and ``neg`` (Q*N, C-1) every other class,
    queries laid out view-major like ``z``.
    """
    e = task_embeddings(z, n_views, temperature)
    n_local = e.shape[1]
    sup = gather_with_grad(e[:n_supp].transpose(0, 1).contiguous()).transpose(0, 1)  # (S, W*N, D)
    query = e[n_supp:].reshape(-1, e.shape[2])  # (Q*N, D)
    offset = get_rank() * n_local
    with torch.autocast(device_type=z.device.type, enabled=False):
        if head == "PN":
            logits = prototype_logits(sup, query)
        elif head == "R2D2":
            logits = query @ ridge_weights(sup, reg).to(query.dtype)
        else:
            raise ValueError(f"unknown head {head!r}; choose from {', '.join(HEADS[1:])}")
    labels = offset + torch.arange(n_local, device=z.device).repeat(n_views - n_supp)
    return split_by_label(logits, labels, temperature)


def split_by_label(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> ContrastiveLogits:
    """(Q, C) class logits -> positives (Q, 1) = the labelled class, negatives (Q, C-1) = the others, in class
    order (column indices computed from the labels: no boolean mask, so no host sync)."""
    cols = torch.arange(logits.shape[1] - 1, device=logits.device)[None, :]
    neg_cols = cols + (cols >= labels[:, None]).long()
    return ContrastiveLogits(pos=logits.gather(1, labels[:, None]), neg=logits.gather(1, neg_cols),
                             temperature=temperature)


@torch.no_grad()
def query_accuracy(logits: ContrastiveLogits) -> torch.Tensor:
    """Fraction of queries whose own class has the highest logit (ties count as wrong)."""
    return (logits.pos[:, 0] > logits.neg.max(dim=1).values).float().mean()
