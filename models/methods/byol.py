"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent"): an online backbone/projector/predictor regresses
the projections a momentum target makes of the other views. Its views are asymmetric (table 6)."""
from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass

import torch
import torch.nn as nn

from common.settings import BOOL, Bounds, setting, typed
from data.augment import ViewSpec
from losses import byol_loss, contrastive_logits, infonce_loss
from models.heads import mlp
from models.methods.base import Logs, MethodSpec, SSLMethod
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

    def after_step(self, step: torch.Tensor, total_steps: int, outputs: dict) -> None:
        self.target.update({"backbone": self.backbone, "projector": self.projector}, step, total_steps)


def byol_views(n_views: int, blur: bool) -> list[ViewSpec]:
    """View 1: blur p=1.0, no solarize; view 2: blur p=0.1, solarize p=0.2; alternating beyond two."""
    pair = [ViewSpec(1.0 if blur else 0.0, 0.0), ViewSpec(0.1 if blur else 0.0, 0.2)]
    return [pair[v % 2] for v in range(n_views)]


def build(cfg: Namespace, backbone: nn.Module, projector: nn.Module, dim: int, num_data: int) -> SSLMethod:
    own = typed(BYOLSettings, cfg)
    predictor = mlp(dim, own.pred_hidden_dim, dim, num_layers=2, hidden_bn=own.pred_bn)
    return BYOL(backbone, projector, predictor, cfg.n_views, own.byol_base_momentum, cfg.temperature,
                own.byol_momentum_schedule)


@dataclass(frozen=True)
class BYOLSettings:
    """BYOL's own settings: the target's momentum and the predictor."""

    byol_base_momentum: float = setting(0.996, "EMA momentum of the target (start of the cosine ramp to 1)",
                                        bounds=Bounds(0, 1, "be in [0, 1]"))
    byol_momentum_schedule: str = setting("cosine", "cosine ramp from the base momentum to 1 (BYOL), or constant "
                                          "(UnsupervisedLearningCodes' BYOL: 0.996 throughout)",
                                          choices=["cosine", "constant"])
    pred_hidden_dim: int = setting(4096, "BYOL predictor hidden width", at_least=1, identity=True)
    pred_bn: bool = setting(True, "BN in the BYOL predictor's hidden layer (BN2)", flag=BOOL, identity=True)


SPEC = MethodSpec(
    display="BYOL", build=build, summary="predictor + momentum target, no negatives", settings=BYOLSettings,
    views=byol_views, tiny={"pred_hidden_dim": 64},
)
