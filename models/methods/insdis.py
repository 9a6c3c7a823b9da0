"""InsDis (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"):
every image is its own class, represented by a slowly updated feature in a memory bank."""
from __future__ import annotations

import math
from argparse import Namespace
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.distributed import all_reduce_sum, gather_no_grad, get_world_size
from common.errors import UserError
from common.settings import Bounds, setting, typed
from losses import insdis_nce_loss, insdis_softmax_loss
from models.methods.base import Logs, MethodSpec, SSLMethod


class InsDis(SSLMethod):
    """Non-parametric instance discrimination against a memory bank of per-image features.

    The bank is a buffer, so it is checkpointed and (under DDP) identical on every rank: the update
    uses the features and dataset indices gathered from all ranks. Negatives for NCE are one uniform
    draw of ``num_negatives`` bank rows shared by the batch (per-anchor draws, as in the paper's code,
    cost B*m*D memory for the same estimator in expectation).
    """

    MAY_BE_UNSET = ("log_z",)  # NaN until the first NCE batch sets it; never set with the softmax loss

    def __init__(self, backbone: nn.Module, projector: nn.Module, n_views: int, num_data: int, dim: int,
                 temperature: float, num_negatives: int, bank_momentum: float, loss: str) -> None:
        super().__init__(backbone, projector, n_views)
        self.temperature = temperature
        self.num_negatives = num_negatives
        self.bank_momentum = bank_momentum
        self.loss_type = loss
        bank = F.normalize(torch.randn(num_data, dim), dim=1)
        self.register_buffer("bank", bank)
        self.register_buffer("log_z", torch.tensor(float("nan")))  # NCE normaliser, set on first batch

    def objective(self, views: list[torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, Logs, dict]:
        z = self.embed(views)  # the networks run under autocast (bf16/fp16 when asked)
        # bank logits, Z and the loss in the bank's precision (fp32; fp64 in the tests' reference): logits of
        # 1/t-scaled dot products lose too much in bf16
        with torch.autocast(device_type=index.device.type, enabled=False):
            return self._objective(F.normalize(z.to(self.bank.dtype), dim=1), index)

    def _objective(self, v: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, Logs, dict]:
        """Loss of the fp32 normalised embeddings ``v`` (V*N, D) of images ``index`` against the bank."""
        idx = index.repeat(self.n_views)  # (V*N,)
        pos_logit = (v * self.bank[idx]).sum(dim=1) / self.temperature
        if self.loss_type == "nce":
            noise = torch.randint(self.bank.shape[0], (self.num_negatives,), device=v.device)
            neg_logits = v @ self.bank[noise].T / self.temperature  # (V*N, m)
            self._set_log_z_once(neg_logits)
            loss = insdis_nce_loss(pos_logit, neg_logits, self.bank.shape[0], self.log_z)
            neg_sim = neg_logits.detach().mean() * self.temperature
        else:
            # (V*N, n); no copy of the bank needed: after_step writes it only after backward
            logits = v @ self.bank.T / self.temperature
            loss = insdis_softmax_loss(logits, idx)
            neg_sim = logits.detach().mean() * self.temperature
        new = v.detach().view(self.n_views, -1, v.shape[1]).mean(dim=0)  # (N, D) mean over views
        logs = {"pos_sim": pos_logit.detach().mean() * self.temperature, "neg_sim": neg_sim, **self.diagnostics(v)}
        return loss, logs, {"index": gather_no_grad(index), "features": gather_no_grad(new)}

    def _set_log_z_once(self, neg_logits: torch.Tensor) -> None:
        """Z = n * E[exp(v.f/t)], estimated once from the first batch over all ranks (Wu et al. 2018). Decided on
        the device (``log_z`` is NaN until set, also in a checkpoint written before the first step), so the step
        reads nothing back to the host and can be captured: the estimate is made every step, all ranks together,
        and kept only where ``log_z`` is still unset."""
        with torch.no_grad():
            mean_exp = all_reduce_sum(neg_logits.detach().exp().mean().reshape(1)) / get_world_size()
            estimate = mean_exp.log()[0] + math.log(self.bank.shape[0])
            self.log_z.copy_(torch.where(torch.isnan(self.log_z), estimate.to(self.log_z.dtype), self.log_z))

    @torch.no_grad()
    def after_step(self, step: torch.Tensor, total_steps: int, outputs: dict) -> None:
        """bank[i] <- normalize(m * bank[i] + (1 - m) * v_i) with this step's features (of all its micro-batches,
        every rank's: their images differ, so one update of them all is the update of the whole batch)."""
        index, feats = outputs["index"], outputs["features"]
        mixed = self.bank[index] * self.bank_momentum + feats * (1.0 - self.bank_momentum)
        self.bank[index] = F.normalize(mixed, dim=1)


def build(cfg: Namespace, backbone: nn.Module, projector: nn.Module, dim: int, num_data: int) -> SSLMethod:
    own = typed(InsDisSettings, cfg)
    return InsDis(backbone, projector, cfg.n_views, num_data, dim, cfg.temperature, own.insdis_num_negatives,
                  own.insdis_bank_momentum, own.insdis_loss)


def validate(cfg: Namespace) -> None:
    if cfg.rot_task_p:
        raise UserError("--rot_task_p makes a rotated image a new class, but InsDis's memory bank keeps one entry per "
                        "image; use it with --clr simclr, flatclr or byol")


@dataclass(frozen=True)
class InsDisSettings:
    """InsDis's own settings: the memory bank and its loss."""

    insdis_num_negatives: int = setting(4096, "NCE noise samples from the bank", at_least=1)
    insdis_bank_momentum: float = setting(0.5, "memory-bank update momentum", bounds=Bounds(0, 1, "be in [0, 1]"))
    insdis_loss: str = setting("nce", "NCE with sampled noise or the full softmax over the bank",
                               choices=["nce", "softmax"])


SPEC = MethodSpec(
    display="InsDis", build=build, summary="memory bank + NCE (or full softmax)", min_views=1, validate=validate,
    settings=InsDisSettings, tiny={"insdis_num_negatives": 64},
)
