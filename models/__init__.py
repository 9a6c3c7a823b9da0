"""Backbones, heads and methods; ``build_method`` assembles the method ``cfg.clr`` names."""
from __future__ import annotations

from argparse import Namespace

from models.backbones import ARCH_ALIASES, BACKBONES, build_backbone
from models.heads import projector_from
from models.methods import METHODS, MethodSpec, SSLMethod


def build_method(cfg: Namespace, num_data: int, cifar_stem: bool) -> SSLMethod:
    """Backbone and projection head from the shared flags, then the method's own ``build``."""
    backbone, feat_dim = build_backbone(cfg.arch, cifar_stem=cifar_stem, width=cfg.width_multiplier)
    projector, dim = projector_from(vars(cfg), feat_dim)
    method = METHODS[cfg.clr].build(cfg, backbone=backbone, projector=projector, dim=dim, num_data=num_data)
    if cfg.rot_pred_weight > 0:
        method.add_rotation_prediction(dim, cfg.rot_pred_weight, bool(cfg.rot_pred_decay), cfg.temperature)
    return method


__all__ = ["ARCH_ALIASES", "BACKBONES", "METHODS", "MethodSpec", "SSLMethod", "build_method"]
