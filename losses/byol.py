"""BYOL regression loss (Grill et al. 2020, "Bootstrap Your Own Latent")."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.infonce import at_least_fp32


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z'), averaged over the batch; the target gets no gradient.

    The symmetric BYOL loss is the sum of this over the (view i -> view j) and (j -> i) pairs.
    """
    p = F.normalize(at_least_fp32(prediction), dim=1)
    z = F.normalize(at_least_fp32(target.detach()), dim=1)
    return (2.0 - 2.0 * (p * z).sum(dim=1)).mean()
