"""Instance discrimination with a memory bank (Wu et al. 2018, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination").

Each image is its own class; its class "weight" is a slowly updated feature in a memory bank.
Two objectives:

* ``nce``: noise-contrastive estimation with ``m`` negatives drawn uniformly from the bank.
  P(i|v) = exp(v.f_i / t) / Z with Z estimated once from the first batch (as in the paper),
  h = P / (P + m / n), loss = -log h(pos) - sum_k log(1 - h(neg_k)).
* ``softmax``: the full non-parametric softmax over all n bank entries.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def insdis_nce_loss(
    pos_logit: torch.Tensor, neg_logits: torch.Tensor, num_data: int, log_z: torch.Tensor
) -> torch.Tensor:
    """NCE loss from temperature-scaled logits.

    Args:
        pos_logit: (B,) v.f_pos / t.
        neg_logits: (B, m) v.f_k / t for m noise samples.
        num_data: n, the bank size; the noise distribution is uniform, Pn = 1/n.
        log_z: log of the normalisation constant Z.
    """
    m = neg_logits.shape[1]
    log_noise = math.log(m / num_data)  # log(m * Pn), a Python float: no host-device copy per step
    log_p_pos = pos_logit - log_z
    log_p_neg = neg_logits - log_z
    # log h = log P - log(P + m Pn); log(1 - h) = log(m Pn) - log(P + m Pn)
    log_h_pos = log_p_pos - torch.logaddexp(log_p_pos, torch.full_like(log_p_pos, log_noise))
    log_1m_h_neg = log_noise - torch.logaddexp(log_p_neg, torch.full_like(log_p_neg, log_noise))
    return -(log_h_pos + log_1m_h_neg.sum(dim=1)).mean()


def insdis_softmax_loss(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Cross entropy of (B, n) logits against the bank over every instance; target = own index."""
    return F.cross_entropy(logits, index)
