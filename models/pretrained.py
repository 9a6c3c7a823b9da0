"""Pretrained backbones for use outside this tool.

    from models.pretrained import load_pretrained
    backbone, meta = load_pretrained("results/cifar10/512_FlatCLR/2026-11-26-10-00-00")  # or a checkpoint,
    features = backbone(images)  # (N, meta["feat_dim"]), images normalised with meta["mean"], meta["std"]

``path`` may be a run directory (its latest epoch-end checkpoint), a ``checkpoint_*.pth.tar`` of a run, or an
export (``RUN/export/<arch>_<method>_ep<N>.pth`` with its ``.json`` beside it, written by ``--train_mode=export``).
The backbone is a torchvision ResNet with ``fc = nn.Identity()``; with the ImageNet stem and width 1 an export
loads into ``torchvision.models.<arch>()`` (strict, once its ``fc`` is replaced by ``nn.Identity()``). With the
CIFAR stem ``conv1`` is 3x3 stride 1 and there is no max-pool: :func:`rebuild` makes that module.
Every file is read through :mod:`models.checkpoint_file` (checksum, then ``weights_only=True``); imports
nothing from ``engine/``.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from models.backbones import BLOCKS, build_backbone
from models.checkpoint_file import (CheckpointError, backbone_weights, latest_epoch_end,  # noqa: F401
                                    read_checkpoint, read_export)
from models.heads import projector_from

EXPORT_SUFFIX = ".pth"


def stem_of(weights: dict[str, torch.Tensor]) -> bool:
    """Whether backbone weights have the CIFAR stem (a 3x3 first convolution)."""
    return weights["conv1.weight"].shape[-1] == 3


def describe(arch: str, weights: dict[str, torch.Tensor], width: float, **extra) -> dict:
    """What a user needs to rebuild and feed the backbone: its architecture, stem, width and feature size, and
    for a CIFAR stem the layers that differ from torchvision's."""
    cifar = stem_of(weights)
    feat_dim = (weights["layer4.0.conv3.weight"] if "layer4.0.conv3.weight" in weights
                else weights["layer4.0.conv2.weight"]).shape[0]
    meta = {"arch": arch, "cifar_stem": cifar, "width_multiplier": width, "feat_dim": int(feat_dim), **extra}
    differs = []
    if cifar:
        differs += ["conv1: 3x3, stride 1, padding 1 (torchvision: 7x7, stride 2)",
                    "maxpool: nn.Identity() (torchvision: 3x3 max-pool, stride 2)"]
    if width != 1.0:
        differs.append(f"every channel count x {width:g} (--width_multiplier; torchvision's {arch} has width 1), so "
                       f"its weights have other shapes and load_state_dict into torchvision.models.{arch}() fails")
    if differs:
        meta["differs_from_torchvision"] = differs
        meta["torchvision"] = "does not load into torchvision as is; rebuild the network with " \
                              "models.pretrained.rebuild(meta) (or torch.hub.load(CLONE, 'backbone', path=...))"
        meta["rebuild"] = "models.pretrained.rebuild(meta)"
    else:
        meta["torchvision"] = f"torchvision.models.{arch}() with fc = nn.Identity()"
    return meta


def rebuild(meta: dict) -> nn.Module:
    """An untrained backbone of the architecture ``meta`` describes (stem and width included)."""
    backbone, _ = build_backbone(meta["arch"], cifar_stem=meta["cifar_stem"], width=meta.get("width_multiplier", 1.0))
    return backbone


def _checkpoint_path(path: str) -> str:
    """A run directory's newest epoch-end checkpoint, or ``path`` itself."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist; pass a run directory, a checkpoint_*.pth.tar or an export")
    return latest_epoch_end(path) if os.path.isdir(path) else path


def read_backbone(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(backbone weights, metadata) of a run directory, checkpoint or export, each file checked against its
    checksum; a bad one raises :class:`models.checkpoint_file.CheckpointError` (one line)."""
    weights, _, meta = read_weights(path)
    return weights, meta


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(backbone weights, projector weights, metadata) from one read of the file; an export has no projector."""
    path = _checkpoint_path(path)
    meta_path = os.path.splitext(path)[0] + ".json"
    if path.endswith(EXPORT_SUFFIX) and os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{meta_path} is not readable json ({err}); export the run again") from err
        if not isinstance(meta, dict) or not {"arch", "cifar_stem"} <= set(meta):
            raise CheckpointError(f"{meta_path} does not describe an export (no arch, cifar_stem); export the run "
                                  "again")
        return read_export(path), {}, meta
    state = read_checkpoint(path)
    weights = backbone_weights(state["model"])
    if not weights:
        raise CheckpointError(f"{path} holds no backbone weights; it was not written by this tool's pretraining")
    args = state.get("args", {})
    stats = args.get("input_stats") or {}
    meta = describe(state.get("arch", args.get("arch")), weights, float(state.get("width_multiplier") or 1.0),
                    method=args.get("clr"), epoch=state.get("epoch"), dataset=args.get("dataset_name"),
                    mean=stats.get("mean"), std=stats.get("std"), image_size=stats.get("image_size"),
                    source=os.path.abspath(path))
    return weights, projector_weights(state), meta


def load_pretrained(path: str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The pretrained backbone at ``path`` (run directory, checkpoint or export) in eval mode on ``map_location``,
    and its metadata (arch, cifar_stem, width_multiplier, feat_dim, and mean/std/image_size when recorded).
    A path that holds no usable backbone raises :class:`models.checkpoint_file.CheckpointError` (a
    :class:`common.errors.UserError`) with one line."""
    weights, meta = read_backbone(path)
    if meta.get("arch") not in BLOCKS:
        raise CheckpointError(f"{path} holds a backbone of an architecture this tool does not build "
                              f"({meta.get('arch')!r})")
    backbone = rebuild(meta)
    try:
        backbone.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit the {meta['arch']} its metadata names "
                              f"({str(err).splitlines()[0][:160]})") from err
    return backbone.to(map_location).eval(), meta


def projector_weights(state: dict) -> dict[str, torch.Tensor]:
    """The ``projector.`` entries of a checkpoint's model state, without the prefix."""
    return {k[len("projector."):]: v for k, v in state.get("model", {}).items() if k.startswith("projector.")}


def load_projector(path: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """The projection head of a run's checkpoint (or a run directory's latest), rebuilt from its saved settings,
    in eval mode: the "FC/projection output" a t-SNE of the seed-001 kind draws."""
    path = _checkpoint_path(path)
    state = read_checkpoint(path)
    args, model = state.get("args", {}), state["model"]
    weights = projector_weights(state)
    if not weights and args.get("proj_head_mode", "nonlinear") != "none":
        raise CheckpointError(f"{path} holds no projection head (an export keeps the backbone only)")
    feat_dim = describe("", backbone_weights(model), 1.0)["feat_dim"]
    head, _ = projector_from(args, feat_dim)
    try:
        head.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its projection head does not fit its saved settings "
                              f"({str(err).splitlines()[0][:160]})") from err
    return head.to(map_location).eval()
