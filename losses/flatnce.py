"""FlatNCE (Chen et al. 2021, "Simpler, Faster, Stronger: Breaking The log-K Curse On Contrastive
Learners With FlatNCE").

Why the loss "is always 1" (the question most asked about FlatCLR): for each anchor let
``v = logsumexp((s_neg - s_pos) / t)`` over its negatives, i.e. ``v = log S`` with
``S = sum_k exp((s_k - s_pos) / t)``. FlatNCE is ``exp(v - v.detach())``: its *value* is exactly 1
whatever the model does, so the value carries no information; its *gradient* is ``grad v``,
the gradient of log S. InfoNCE for the same anchor is ``log(1 + S)``, whose gradient is
``S / (1 + S) * grad log S``. So per anchor

    grad FlatNCE = grad InfoNCE * (1 + S) / S.

When the positive already dominates (S -> 0, the small-batch regime where InfoNCE saturates and its
gradient vanishes), FlatNCE rescales it back up: that is the fix for the "log-K curse". Since
the value is constant, :func:`flatnce_loss` returns ``exp(v - v.detach()).mean() - 1`` (value 0,
FlatNCE gradient) plus the detached InfoNCE, so the number printed and logged is the InfoNCE value
of the same batch, as the FlatCLR repository does, and the gradient is FlatNCE's alone.
"""
from __future__ import annotations

import torch

from losses.infonce import ContrastiveLogits


def flatnce_loss(logits: ContrastiveLogits) -> torch.Tensor:
    """FlatNCE gradient, detached-InfoNCE value; averaged over anchors and positives."""
    # (V*N, V-1, K): negatives minus each positive, one row of the logsumexp per (anchor, positive).
    diff = logits.neg[:, None, :] - logits.pos[:, :, None]
    v = torch.logsumexp(diff, dim=2)
    flat = torch.exp(v - v.detach()).mean() - 1.0  # value exactly 0, gradient mean(grad v)
    return flat + logits.infonce_per_pair().mean().detach()
