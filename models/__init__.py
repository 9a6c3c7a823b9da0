"""Backbones, heads and methods; ``build_method`` assembles one from the resolved config."""
from __future__ import annotations

from argparse import Namespace

from models.backbones import ARCH_ALIASES, BACKBONES, build_backbone
from models.heads import mlp, projection_head
from models.methods import BYOL, ContrastiveMethod, InsDis, SSLMethod

# --clr name -> display name used in run directories (FlatCLR's results/<ds>/<bs>_<Method>/).
METHODS = {"simclr": "SimCLR", "flatclr": "FlatCLR", "byol": "BYOL", "insdis": "InsDis"}


def build_method(cfg: Namespace, num_data: int, cifar_stem: bool) -> SSLMethod:
    """The method module for ``cfg.clr``; ``num_data`` sizes the InsDis memory bank."""
    backbone, feat_dim = build_backbone(cfg.arch, cifar_stem=cifar_stem)
    projector, dim = projection_head(
        cfg.proj_head_mode, feat_dim, cfg.proj_hidden_dim or feat_dim, cfg.proj_out_dim, cfg.num_proj_layers,
        hidden_bn=cfg.proj_bn, out_bn=cfg.proj_out_bn, out_bn_affine=cfg.proj_out_bn_affine,
    )
    if cfg.clr in ("simclr", "flatclr"):
        loss = "infonce" if cfg.clr == "simclr" else "flatnce"
        return ContrastiveMethod(backbone, projector, cfg.n_views, cfg.temperature, loss)
    if cfg.clr == "byol":
        predictor = mlp(dim, cfg.pred_hidden_dim, dim, num_layers=2, hidden_bn=cfg.pred_bn)
        return BYOL(backbone, projector, predictor, cfg.n_views, cfg.byol_base_momentum, cfg.temperature)
    if cfg.clr == "insdis":
        return InsDis(backbone, projector, cfg.n_views, num_data, dim, cfg.temperature,
                      cfg.insdis_num_negatives, cfg.insdis_bank_momentum, cfg.insdis_loss)
    raise KeyError(cfg.clr)


__all__ = ["ARCH_ALIASES", "BACKBONES", "METHODS", "BYOL", "ContrastiveMethod", "InsDis", "SSLMethod",
           "build_method"]
