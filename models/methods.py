"""Self-supervised methods. Each one is an ``nn.Module`` that owns its networks and its loss
(the MoCo-v3 pattern): ``forward(views, index) -> (loss, logs)`` and ``after_step(step, total)``
for what happens after the optimizer step. DDP wraps the whole module, and the training loop never
needs to know which method it runs.

* SimCLR: Chen et al. 2020, InfoNCE / NT-Xent.
* FlatCLR: Chen et al. 2021, FlatNCE on the same logits.
* BYOL: Grill et al. 2020, predictor + EMA target with cosine momentum ramp.
* InsDis: Wu et al. 2018, memory bank + NCE (or full softmax).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.distributed import all_reduce_sum, gather_no_grad, gather_with_grad, get_rank, get_world_size
from losses import LOSSES, byol_loss, contrastive_logits, infonce_loss, insdis_nce_loss, insdis_softmax_loss

Logs = dict[str, torch.Tensor]


class SSLMethod(nn.Module):
    """Backbone + projector; subclasses define the objective."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, n_views: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.n_views = n_views

    def embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Projections of all views, view-major: (V*N, D)."""
        return self.projector(self.backbone(torch.cat(views)))

    def after_step(self, step: int, total_steps: int) -> None:
        """Called once after each optimizer step; ``step`` counts completed steps (1-based)."""


class ContrastiveMethod(SSLMethod):
    """SimCLR (``loss="infonce"``) and FlatCLR (``loss="flatnce"``): same logits, other reduction."""

    def __init__(self, backbone, projector, n_views: int, temperature: float, loss: str) -> None:
        super().__init__(backbone, projector, n_views)
        self.temperature = temperature
        self.loss_fn = LOSSES[loss]

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        z = self.embed(views)  # (V*N, D)
        keys = gather_with_grad(z)  # (W*V*N, D): negatives from every rank
        logits = contrastive_logits(z, self.n_views, self.temperature, keys, offset=get_rank() * z.shape[0])
        loss = self.loss_fn(logits)
        logs = {"infonce": infonce_loss(logits).detach(), **logits.similarity_stats()}
        return loss, logs


class BYOL(SSLMethod):
    """Online backbone/projector/predictor regress an EMA target's projections of the other views."""

    def __init__(self, backbone, projector, predictor: nn.Module, n_views: int, base_momentum: float,
                 temperature: float) -> None:
        super().__init__(backbone, projector, n_views)
        self.predictor = predictor
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(projector).requires_grad_(False)
        self.base_momentum = base_momentum
        self.temperature = temperature  # only for the InfoNCE diagnostic in the logs
        self.register_buffer("momentum", torch.tensor(base_momentum, dtype=torch.float64))

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        z = self.embed(views)
        p = self.predictor(z).chunk(self.n_views)
        with torch.no_grad():
            t = self.target_projector(self.target_backbone(torch.cat(views))).chunk(self.n_views)
        pairs = [(i, j) for i in range(self.n_views) for j in range(self.n_views) if i != j]
        # Sum over the two directions for two views, as in the paper (range [0, 8]).
        loss = sum(byol_loss(p[i], t[j]) for i, j in pairs) * (2.0 / len(pairs))
        with torch.no_grad():  # collapse monitor: InfoNCE and similarities of the online projections
            logits = contrastive_logits(z.detach(), self.n_views, self.temperature)
            logs = {"infonce": infonce_loss(logits), **logits.similarity_stats(), "momentum": self.momentum.float()}
        return loss, logs

    def target_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def momentum_at(self, step: int, total_steps: int) -> float:
        """Cosine ramp from the base momentum at step 0 to 1 at the last step (BYOL, eq. in sec. 3.2)."""
        progress = min(step / max(total_steps, 1), 1.0)
        return 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update with this step's momentum, computed on the host (reading the buffer back from
        the GPU would synchronise every step); the buffer keeps the next value for logs and checkpoints."""
        m = self.momentum_at(step - 1, total_steps)
        for online, target in self.target_pairs():
            torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - m)
        self.momentum.fill_(self.momentum_at(step, total_steps))


class InsDis(SSLMethod):
    """Non-parametric instance discrimination against a memory bank of per-image features.

    The bank is a buffer, so it is checkpointed and (under DDP) identical on every rank: the update
    uses the features and dataset indices gathered from all ranks. Negatives for NCE are one uniform
    draw of ``num_negatives`` bank rows shared by the batch (per-anchor draws, as in the paper's code,
    cost B*m*D memory for the same estimator in expectation).
    """

    def __init__(self, backbone, projector, n_views: int, num_data: int, dim: int, temperature: float,
                 num_negatives: int, bank_momentum: float, loss: str) -> None:
        super().__init__(backbone, projector, n_views)
        self.temperature = temperature
        self.num_negatives = num_negatives
        self.bank_momentum = bank_momentum
        self.loss_type = loss
        bank = F.normalize(torch.randn(num_data, dim), dim=1)
        self.register_buffer("bank", bank)
        self.register_buffer("log_z", torch.tensor(float("nan")))  # NCE normaliser, set on first batch
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._z_known = False  # avoids a host sync per step once log_z is set (or loaded)

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        with torch.autocast(device_type=index.device.type, enabled=False):
            v = F.normalize(self.embed(views).float(), dim=1)  # (V*N, D)
        idx = index.repeat(self.n_views)  # (V*N,)
        pos_logit = (v * self.bank[idx]).sum(dim=1) / self.temperature
        if self.loss_type == "nce":
            noise = torch.randint(self.bank.shape[0], (self.num_negatives,), device=v.device)
            neg_logits = v @ self.bank[noise].T / self.temperature  # (V*N, m)
            if not self._z_known:
                self._z_known = not bool(torch.isnan(self.log_z))
            if not self._z_known:  # Z = n * E[exp(v.f/t)], estimated once (Wu et al. 2018)
                self._z_known = True
                with torch.no_grad():
                    mean_exp = all_reduce_sum(neg_logits.detach().exp().mean().reshape(1)) / get_world_size()
                    self.log_z.copy_(mean_exp.log()[0] + math.log(self.bank.shape[0]))
            loss = insdis_nce_loss(pos_logit, neg_logits, self.bank.shape[0], self.log_z)
            neg_sim = neg_logits.detach().mean() * self.temperature
        else:
            # (V*N, n); no copy of the bank needed: after_step writes it only after backward
            logits = v @ self.bank.T / self.temperature
            loss = insdis_softmax_loss(logits, idx)
            neg_sim = logits.detach().mean() * self.temperature
        new = v.detach().view(self.n_views, -1, v.shape[1]).mean(dim=0)  # (N, D) mean over views
        self._pending = (gather_no_grad(index), gather_no_grad(new))
        logs = {"pos_sim": pos_logit.detach().mean() * self.temperature, "neg_sim": neg_sim}
        return loss, logs

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """bank[i] <- normalize(m * bank[i] + (1 - m) * v_i) with this step's features."""
        if self._pending is None:
            return
        index, feats = self._pending
        mixed = self.bank[index] * self.bank_momentum + feats * (1.0 - self.bank_momentum)
        self.bank[index] = F.normalize(mixed, dim=1)
        self._pending = None
