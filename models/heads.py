"""Projection heads and the BYOL predictor.

Batch-norm placement follows the ablation in unsupervisedlearningcodes (shared seed 001), whose
three switches map to flags: BN1 = ``--proj_bn`` (hidden layers of the projection MLP), BN2 =
``--pred_bn`` (hidden layer of the BYOL predictor), BN3 = ``--proj_out_bn`` (output of the
projection, optionally without affine parameters: ``--no-proj_out_bn_affine``).
"""
from __future__ import annotations

import torch.nn as nn


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    hidden_bn: bool = True,
    out_bn: bool = False,
    out_bn_affine: bool = True,
) -> nn.Sequential:
    """``num_layers`` Linear layers; between them (BN) + ReLU; optional BN on the output."""
    if num_layers < 1:
        raise ValueError("an MLP needs at least one layer")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not hidden_bn))
        if hidden_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not out_bn))
    if out_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=out_bn_affine))
    return nn.Sequential(*layers)


def projection_head(
    mode: str,
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int,
    hidden_bn: bool,
    out_bn: bool,
    out_bn_affine: bool,
) -> tuple[nn.Module, int]:
    """FlatCLR's ``--proj_head_mode``: nonlinear MLP, one linear layer, or none. Returns (head, dim)."""
    if mode == "none":
        return nn.Identity(), in_dim
    if mode == "linear":
        num_layers = 1
    return mlp(in_dim, hidden_dim, out_dim, num_layers, hidden_bn, out_bn, out_bn_affine), out_dim



def projector_from(settings: dict, feat_dim: int) -> tuple[nn.Module, int]:
    """The projection head a run's settings (its flags, as a mapping) describe on ``feat_dim`` features; flags a
    run recorded before they existed take their defaults. Returns (head, output dim)."""
    return projection_head(settings.get("proj_head_mode", "nonlinear"), feat_dim,
                           settings.get("proj_hidden_dim") or feat_dim, settings.get("proj_out_dim", 128),
                           settings.get("num_proj_layers", 2), hidden_bn=settings.get("proj_bn", True),
                           out_bn=settings.get("proj_out_bn", False),
                           out_bn_affine=settings.get("proj_out_bn_affine", True))
