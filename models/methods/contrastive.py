"""SimCLR (Chen et al. 2020, InfoNCE / NT-Xent) and FlatCLR (Chen et al. 2021, FlatNCE): one module, the
same logits with negatives from every rank, and another reduction of them."""
from __future__ import annotations

from argparse import Namespace

import torch
import torch.nn as nn

from common.distributed import gather_with_grad, get_rank
from losses import LOSSES, contrastive_logits, infonce_loss
from losses.diagnostics import contrastive_stats
from models.methods.base import Logs, MethodSpec, SSLMethod


class ContrastiveMethod(SSLMethod):
    """SimCLR (``loss="infonce"``) and FlatCLR (``loss="flatnce"``): same logits, other reduction."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, n_views: int, temperature: float,
                 loss: str) -> None:
        super().__init__(backbone, projector, n_views)
        self.temperature = temperature
        self.loss_fn = LOSSES[loss]

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        z = self.embed(views)  # (V*N, D)
        keys = gather_with_grad(z)  # (W*V*N, D): negatives from every rank
        logits = contrastive_logits(z, self.n_views, self.temperature, keys, offset=get_rank() * z.shape[0])
        loss = self.loss_fn(logits)
        infonce = infonce_loss(logits).detach()
        logs = {"infonce": infonce, **logits.similarity_stats(), **self.diagnostics(z)}
        if self.diagnose:
            logs.update(contrastive_stats(logits, infonce))
        return loss, logs


def _builder(loss: str):
    def build(cfg: Namespace, backbone: nn.Module, projector: nn.Module, dim: int, num_data: int) -> SSLMethod:
        return ContrastiveMethod(backbone, projector, cfg.n_views, cfg.temperature, loss)

    return build


SIMCLR = MethodSpec(display="SimCLR", build=_builder("infonce"), summary="InfoNCE over in-batch negatives")
FLATCLR = MethodSpec(display="FlatCLR", build=_builder("flatnce"),
                     summary="FlatNCE: InfoNCE's logits, a reduction that does not fade at small batches")
