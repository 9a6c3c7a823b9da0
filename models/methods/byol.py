"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent"): an online backbone/projector/predictor regresses
the projections a momentum target makes of the other views. Its views are asymmetric (table 6)."""
from __future__ import annotations

from argparse import Namespace

import torch
import torch.nn as nn

from common.errors import UserError
from data.augment import ViewSpec
from losses import byol_loss, contrastive_logits, infonce_loss
from models.heads import mlp
from models.methods.base import Flag, Logs, MethodSpec, SSLMethod
from models.momentum import MomentumTarget


class BYOL(SSLMethod):
    """Online backbone/projector/predictor regress an EMA target's projections of the other views."""

    # Checkpoints written before the momentum target became its own module.
    LEGACY_KEYS = {"target_backbone.": "target.backbone.", "target_projector.": "target.projector.",
                   "momentum": "target.momentum"}

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module, n_views: int,
                 base_momentum: float, temperature: float, momentum_schedule: str = "cosine") -> None:
        super().__init__(backbone, projector, n_views)
        self.predictor = predictor
        self.target = MomentumTarget({"backbone": backbone, "projector": projector}, base_momentum,
                                     momentum_schedule)
        self.temperature = temperature  # only for the InfoNCE diagnostic in the logs

    def objective(self, views: list[torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        z = self.embed(views)
        p = self.predictor(z).chunk(self.n_views)
        with torch.no_grad():
            t = self.target(torch.cat(views)).chunk(self.n_views)
        pairs = [(i, j) for i in range(self.n_views) for j in range(self.n_views) if i != j]
        # Sum over the two directions for two views, as in the paper (range [0, 8]).
        loss = sum(byol_loss(p[i], t[j]) for i, j in pairs) * (2.0 / len(pairs))
        with torch.no_grad():  # collapse monitor: InfoNCE and similarities of the online projections
            logits = contrastive_logits(z.detach(), self.n_views, self.temperature)
            logs = {"infonce": infonce_loss(logits), **logits.similarity_stats(),
                    "momentum": self.target.momentum.float(), **self.diagnostics(z)}
        return loss, logs

    def after_step(self, step: int, total_steps: int, outputs: dict) -> None:
        self.target.update({"backbone": self.backbone, "projector": self.projector}, step, total_steps)


def byol_views(n_views: int, blur: bool) -> list[ViewSpec]:
    """View 1: blur p=1.0, no solarize; view 2: blur p=0.1, solarize p=0.2; alternating beyond two."""
    pair = [ViewSpec(1.0 if blur else 0.0, 0.0), ViewSpec(0.1 if blur else 0.0, 0.2)]
    return [pair[v % 2] for v in range(n_views)]


def build(cfg: Namespace, backbone: nn.Module, projector: nn.Module, dim: int, num_data: int) -> SSLMethod:
    predictor = mlp(dim, cfg.pred_hidden_dim, dim, num_layers=2, hidden_bn=cfg.pred_bn)
    return BYOL(backbone, projector, predictor, cfg.n_views, cfg.byol_base_momentum, cfg.temperature,
                cfg.byol_momentum_schedule)


def validate(cfg: Namespace) -> None:
    if not 0 <= cfg.byol_base_momentum <= 1:
        raise UserError(f"--byol_base_momentum must be in [0, 1], got {cfg.byol_base_momentum}")
    if cfg.pred_hidden_dim < 1:
        raise UserError(f"--pred_hidden_dim must be at least 1, got {cfg.pred_hidden_dim}")


SPEC = MethodSpec(
    display="BYOL", build=build, summary="predictor + momentum target, no negatives",
    flags=(Flag("byol_base_momentum", 0.996, "EMA momentum of the target (start of the cosine ramp to 1)"),
           Flag("byol_momentum_schedule", "cosine", "cosine ramp from the base momentum to 1 (BYOL), or constant "
                "(UnsupervisedLearningCodes' BYOL: 0.996 throughout)", choices=("cosine", "constant")),
           Flag("pred_hidden_dim", 4096, "BYOL predictor hidden width"),
           Flag("pred_bn", True, "BN in the BYOL predictor's hidden layer (BN2)")),
    identity=("pred_hidden_dim", "pred_bn"), views=byol_views, validate=validate, tiny={"pred_hidden_dim": 64},
)
