"""SimCLR (Chen et al. 2020, InfoNCE / NT-Xent) and FlatCLR (Chen et al. 2021, FlatNCE): one module, the
same logits with negatives from every rank, and another reduction of them.

``--head PN`` or ``--head R2D2`` replaces the pairwise logits by a meta-learning head's (losses/meta.py,
MetaContrastive): the global batch is a task with one class per image, the first ``--n_supp`` views of each
image its support set and the other ``--n_query`` its queries; InfoNCE is then the head's cross-entropy and
FlatNCE its flat version."""
from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass

import torch
import torch.nn as nn

import sys

from common.distributed import gather_with_grad, get_rank
from common.errors import UserError
from common.settings import setting, typed
from losses import LOSSES, contrastive_logits, infonce_loss
from losses.diagnostics import contrastive_stats
from losses.meta import HEADS, head_logits, query_accuracy
from models.methods.base import Logs, MethodSpec, SSLMethod


class ContrastiveMethod(SSLMethod):
    """SimCLR (``loss="infonce"``) and FlatCLR (``loss="flatnce"``): same logits, other reduction."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, n_views: int, temperature: float,
                 loss: str, head: str = "contrastive", n_supp: int = 1, reg: float = 50.0,
                 similarity: str = "cosine") -> None:
        super().__init__(backbone, projector, n_views)
        self.temperature = temperature
        self.loss_fn = LOSSES[loss]
        self.head, self.n_supp, self.reg = head, n_supp, reg
        self.cosine = similarity == "cosine"

    def objective(self, views: list[torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        z = self.embed(views)  # (V*N, D)
        if self.head == "contrastive":
            keys = gather_with_grad(z)  # (W*V*N, D): negatives from every rank
            logits = contrastive_logits(z, self.n_views, self.temperature, keys, offset=get_rank() * z.shape[0],
                                        cosine=self.cosine)
            stats = logits.similarity_stats()
        else:  # the task's classes are every rank's images (losses/meta.py gathers the support sets)
            logits = head_logits(self.head, z, self.n_supp, self.n_views, self.temperature, self.reg)
            stats = {"query_acc": query_accuracy(logits)}
        loss = self.loss_fn(logits)
        infonce = infonce_loss(logits).detach()
        logs = {"infonce": infonce, **stats, **self.diagnostics(z)}
        if self.diagnose:
            logs.update(contrastive_stats(logits, infonce))
        return loss, logs


def _builder(loss: str):
    def build(cfg: Namespace, backbone: nn.Module, projector: nn.Module, dim: int, num_data: int) -> SSLMethod:
        own = typed(ContrastiveSettings, cfg)
        return ContrastiveMethod(backbone, projector, cfg.n_views, cfg.temperature, loss,
                                 head=own.head, n_supp=own.n_supp, reg=own.reg, similarity=own.similarity)

    return build


def settle(cfg: Namespace) -> None:
    """--n_supp + --n_query is the number of views (--n_views, or the authors' --multiplier): the one not given
    follows from the others, and a contradiction is one line. With neither --n_query nor --n_views, 1 + 1."""
    if cfg.n_query is None:
        cfg.n_views = cfg.n_views if cfg.n_views is not None else cfg.n_supp + 1
        cfg.n_query = cfg.n_views - cfg.n_supp
    elif cfg.n_views is None:
        cfg.n_views = cfg.n_supp + cfg.n_query
    elif cfg.n_views != cfg.n_supp + cfg.n_query:
        raise UserError(f"--n_views (--multiplier) {cfg.n_views} is not --n_supp {cfg.n_supp} + --n_query "
                        f"{cfg.n_query}; pass the views as one of the two")


def validate(cfg: Namespace) -> None:
    if cfg.n_supp < 1 or cfg.n_query < 1:
        raise UserError(f"a task needs at least one support and one query view per image; got --n_supp "
                        f"{cfg.n_supp} and --n_query {cfg.n_query} (--n_views {cfg.n_views})")
    if cfg.head == "R2D2" and not cfg.reg > 0:
        raise UserError(f"--reg (the R2D2 ridge) must be positive, got {cfg.reg}")
    if cfg.head != "R2D2" and cfg.reg != 50.0:
        raise UserError(f"--reg is the ridge of --head R2D2 and does nothing with --head {cfg.head}; drop it or pass "
                        "--head R2D2")
    if cfg.head != "contrastive" and cfg.similarity != "cosine":
        raise UserError(f"--similarity {cfg.similarity} is for SimCLR's pairwise logits; --head {cfg.head} normalises "
                        "its embeddings: drop --similarity or use --head contrastive")
    if cfg.head == "contrastive" and cfg.n_supp != 1:
        raise UserError(f"--n_supp is the support set of --head PN/R2D2; with --head contrastive every view is an "
                        f"anchor: pass --n_views {cfg.n_views} instead, or a --head")
    if cfg.head == "contrastive" and cfg.temperature > 1 and get_rank() == 0:
        print(f"warning: --temperature {cfg.temperature:g} divides the similarities here (logits = cos/t); "
              f"MetaContrastive's contrastive head multiplied by it, so its --temperature 10 is 0.1 here",
              file=sys.stderr)


@dataclass(frozen=True)
class ContrastiveSettings:
    """SimCLR's and FlatCLR's own settings: the pairwise logits, or a meta-learning head (MetaContrastive)."""

    head: str = setting("contrastive", "contrastive: SimCLR/FlatCLR's pairwise logits; PN or R2D2: a meta-learning "
                        "head on the task of the global batch (one class per image; MetaContrastive)",
                        choices=list(HEADS), identity=True, exclusive=True)
    n_supp: int = setting(1, "support views per image (the first ones) of --head PN/R2D2", identity=True,
                          exclusive=True)
    n_query: int | None = setting(None, "query views per image (default: --n_views - --n_supp); --n_supp + --n_query "
                                  "is --n_views", identity=True, exclusive=True)
    reg: float = setting(50.0, "ridge (lambda) of the R2D2 head", identity=True, exclusive=True)
    similarity: str = setting("cosine", "logits of --head contrastive: cosine similarity / t (SimCLR), or the raw "
                              "dot product / t (sthalles/SimCLR's use_cosine_similarity: False)",
                              choices=["cosine", "dot"], identity=True, exclusive=True)


SIMCLR = MethodSpec(display="SimCLR", build=_builder("infonce"), summary="InfoNCE over in-batch negatives",
                    settings=ContrastiveSettings, settle=settle, validate=validate,
                    losses={"infonce": "simclr", "flatnce": "flatclr"}, loss="infonce")
FLATCLR = MethodSpec(display="FlatCLR", build=_builder("flatnce"),
                     summary="FlatNCE: InfoNCE's logits, a reduction that does not fade at small batches",
                     settings=ContrastiveSettings, settle=settle, validate=validate, losses={"flatnce": "flatclr"},
                     loss="flatnce")
