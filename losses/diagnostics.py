"""Diagnostics of contrastive training ("new tools to monitor and diagnose", FlatNCE's abstract), computed
on the logging steps only (``SSLMethod.diagnose``), detached, as device tensors (no host sync).

For every method, of the L2-normalised projections of one batch (Wang & Isola 2020 for the first two):

- ``alignment``: mean squared distance between two views of an image, E||f(x) - f(x+)||^2 (0 is perfect);
- ``uniformity``: log E exp(-2 ||f(x) - f(y)||^2) over pairs of different images within a view, averaged
  over the views (lower is more uniform; -4 is the floor of the sphere in high dimension, 0 a collapse to
  one point);
- ``emb_std``: per-dimension standard deviation, averaged (1/sqrt(D) for points spread on the sphere,
  0 for a collapse);
- ``erank``: effective rank (Roy & Vetterli 2007) of the (uncentred) normalised embedding matrix,
  exp of the entropy of its normalised singular values: 1 for a collapse to one direction, D at most.
  The training loop warns when it stays below ``COLLAPSE_RANK`` for ``COLLAPSE_WINDOWS`` logging windows.

For contrastive logits (see losses/flatnce.py for S): the mean and 10/50/90% quantiles of log S with
S = sum_k exp((s_k - s_+)/t), FlatNCE's gradient over InfoNCE's, (1+S)/S (its mean), and InfoNCE's
lower bound on mutual information, log K - L_InfoNCE, beside its ceiling log K (K candidates: the
negatives and the positive).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from losses.infonce import ContrastiveLogits

COLLAPSE_RANK = 2.0  # effective rank under which the embedding counts as collapsed
COLLAPSE_WINDOWS = 3  # consecutive logging windows before the warning
MAX_ROWS = 1024  # pairwise statistics on at most this many rows (the first ones): bounded cost


@torch.no_grad()
def embedding_stats(z: torch.Tensor, n_views: int) -> dict[str, torch.Tensor]:
    """Alignment, uniformity, per-dimension std and effective rank of projections ``z`` (V*N, D), view-major."""
    v = F.normalize(z.detach().float(), dim=1)
    n = v.shape[0] // n_views
    views = v[: n * n_views].view(n_views, n, -1)
    stats = {}
    if n_views > 1:
        pairs = [(i, j) for i in range(n_views) for j in range(i + 1, n_views)]
        stats["alignment"] = torch.stack([(views[i] - views[j]).pow(2).sum(1).mean() for i, j in pairs]).mean()
    per_view = []
    for view in views:  # within each view, as Wang & Isola: the other view of an image is no "other point"
        rows = view[:MAX_ROWS]
        if len(rows) > 1:
            sq = (2 - 2 * rows @ rows.T).clamp_min(0)  # squared distances of unit vectors
            diagonal = torch.eye(len(rows), dtype=torch.bool, device=v.device)
            logits = (-2 * sq).masked_fill(diagonal, float("-inf"))  # a mask, not an index: no host sync
            per_view.append(torch.logsumexp(logits.flatten(), dim=0) - math.log(len(rows) * (len(rows) - 1)))
    if per_view:
        stats["uniformity"] = torch.stack(per_view).mean()
    stats["emb_std"] = v.std(dim=0).mean()
    stats["erank"] = effective_rank(v)
    return stats


def effective_rank(m: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the singular values of ``m`` normalised to sum 1); NaN when ``m`` is not finite (the
    SVD would raise, and the step's own check names the problem)."""
    m = m.float()
    finite = torch.isfinite(m).all()
    s = torch.linalg.svdvals(torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0))
    p = s / s.sum().clamp_min(1e-12)
    erank = torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())
    return torch.where(finite, erank, torch.full_like(erank, float("nan")))


@torch.no_grad()
def contrastive_stats(logits: ContrastiveLogits, infonce: torch.Tensor) -> dict[str, torch.Tensor]:
    """log S statistics, FlatNCE/InfoNCE gradient ratio and the InfoNCE MI bound of these logits."""
    log_s = (torch.logsumexp(logits.neg.float(), dim=1, keepdim=True) - logits.pos.float()).flatten()
    q = torch.quantile(log_s, torch.tensor([0.1, 0.5, 0.9], device=log_s.device))
    log_k = math.log(logits.neg.shape[1] + 1)
    return {"log_s": log_s.mean(), "log_s_p10": q[0], "log_s_p50": q[1], "log_s_p90": q[2],
            "flat_grad_ratio": (1 + torch.exp(-log_s)).mean(), "mi_bound": log_k - infonce.float(),
            "log_k": torch.tensor(log_k, device=log_s.device)}
