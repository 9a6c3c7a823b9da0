"""Pretrained backbones for use outside this tool.

    from models.pretrained import load_pretrained
    backbone, meta = load_pretrained("results/cifar10/512_FlatCLR/2026-11-26-10-00-00")  # or a checkpoint,
    features = backbone(images)  # (N, meta["feat_dim"]), images normalised with meta["mean"], meta["std"]

``path`` may be a run directory (its latest epoch-end checkpoint), a ``checkpoint_*.pth.tar`` of a run, or an
export (``RUN/export/<arch>_<method>_ep<N>.pth`` with its ``.json`` beside it, written by ``--train_mode=export``).
The backbone is a torchvision ResNet with ``fc = nn.Identity()``; with the ImageNet stem and width 1 an export
loads into ``torchvision.models.<arch>()`` (strict, once its ``fc`` is replaced by ``nn.Identity()``). With the
CIFAR stem ``conv1`` is 3x3 stride 1 and there is no max-pool: :func:`rebuild` makes that module.
Reads with ``weights_only=True`` only; imports nothing from ``engine/``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import torch
import torch.nn as nn

from common.distributed import launched_rank
from models.backbones import BLOCKS, build_backbone
from models.heads import projector_from

EXPORT_SUFFIX = ".pth"
CHECKPOINT = re.compile(r"checkpoint_(\d{4,})\.pth\.tar$")
# MetaContrastive's checkpoints hold their argparse hyper-parameters: a plain container, allowed in weights_only
# loads (which refuse arbitrary objects).
torch.serialization.add_safe_globals([argparse.Namespace])
FLATCLR_MODELS = {f"res{d}": f"resnet{d}" for d in (18, 34, 50, 101, 152)}
_told: set[str] = set()


def arch_of(weights: dict[str, torch.Tensor]) -> str | None:
    """The ResNet whose blocks these backbone weights have (counted per stage), or None."""
    bottleneck = any(k.endswith(".conv3.weight") for k in weights)
    counts = [len({k.split(".")[1] for k in weights if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    for name, (block, layers) in BLOCKS.items():
        if layers == counts and (block.expansion == 4) == bottleneck:
            return name
    return None


def foreign_checkpoint(state: dict, path: str) -> dict | None:
    """A checkpoint written by the original FlatCLR code (``model_state_dict``: its torchvision-style ResNet
    with the projection head as ``fc`` and an input ``normalize`` module, ``module.`` prefixes under
    DataParallel) or by MetaContrastive (``state_dict`` of its encoder: ``convnet.`` backbone, ``projection.``
    head, ``hparams``), as this tool's layout: the backbone only (their heads, optimizers and schedules are not
    used). None for anything else. Says once per file what was mapped."""
    if not isinstance(state, dict):
        return None
    if isinstance(state.get("model_state_dict"), dict):
        layout, raw = "FlatCLR", state["model_state_dict"]
        raw = {k[len("module."):] if k.startswith("module.") else k: v for k, v in raw.items()}
        weights = {k: v for k, v in raw.items() if not k.startswith(("fc.", "normalize."))}
        arch = FLATCLR_MODELS.get(str(state.get("model"))) or arch_of(weights)
        epoch = int(m.group(1)) if (m := CHECKPOINT.search(os.path.basename(path))) else int(state.get("epoch") or 0)
        dropped = "its projection head (fc) and input normalisation (this tool normalises with the dataset's stats)"
    elif isinstance(state.get("state_dict"), dict) and any("convnet." in k for k in state["state_dict"]):
        layout, raw = "MetaContrastive", state["state_dict"]
        raw = {k[k.index("convnet."):]: v for k, v in raw.items() if "convnet." in k}
        weights = {k[len("convnet."):]: v for k, v in raw.items() if not k.startswith("convnet.fc.")}
        hparams = state.get("hparams")
        arch = str(getattr(hparams, "arch", "")).lower() or arch_of(weights)
        epoch = int(state.get("iter") or 0)
        dropped = "its projection head and rotation head"
    else:
        return None
    if arch not in BLOCKS:
        raise ValueError(f"{path} is a {layout} checkpoint of a backbone this tool does not build ({arch})")
    if path not in _told and launched_rank() == 0:
        _told.add(path)
        print(f"note: {path} is a {layout} checkpoint: mapped its {arch} backbone ({len(weights)} tensors) onto "
              f"this tool's; {dropped}, optimizer and schedule are not used", file=sys.stderr)
    return {"model": {f"backbone.{k}": v for k, v in weights.items()}, "arch": arch, "epoch": epoch,
            "width_multiplier": 1.0, "foreign": layout, "args": {"arch": arch, "clr": layout.lower()}}


def backbone_weights(model_state: dict) -> dict[str, torch.Tensor]:
    """The ``backbone.`` entries of a method's state dict, without the prefix."""
    return {k[len("backbone."):]: v for k, v in model_state.items() if k.startswith("backbone.")}


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
    if cifar:
        meta["differs_from_torchvision"] = ["conv1: 3x3, stride 1, padding 1 (torchvision: 7x7, stride 2)",
                                            "maxpool: nn.Identity() (torchvision: 3x3 max-pool, stride 2)"]
        meta["rebuild"] = "models.pretrained.rebuild(meta)"
    elif width == 1.0:
        meta["torchvision"] = f"torchvision.models.{arch}() with fc = nn.Identity()"
    return meta


def rebuild(meta: dict) -> nn.Module:
    """An untrained backbone of the architecture ``meta`` describes (stem and width included)."""
    backbone, _ = build_backbone(meta["arch"], cifar_stem=meta["cifar_stem"], width=meta.get("width_multiplier", 1.0))
    return backbone


def _latest_checkpoint(run_dir: str) -> str:
    found = {int(m.group(1)): p for p in glob.glob(os.path.join(run_dir, "checkpoint_*.pth.tar"))
             if (m := CHECKPOINT.search(os.path.basename(p)))}
    if not found:
        raise FileNotFoundError(f"no checkpoint_NNNN.pth.tar in {run_dir}")
    return found[max(found)]


def read_backbone(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(backbone weights, metadata) of a run directory, checkpoint or export."""
    if os.path.isdir(path):
        path = _latest_checkpoint(path)
    meta_path = os.path.splitext(path)[0] + ".json"
    if path.endswith(EXPORT_SUFFIX) and os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        return torch.load(path, map_location="cpu", weights_only=True), meta
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and not isinstance(state.get("model"), dict):  # FlatCLR's "model" is its arch name
        state = foreign_checkpoint(state, path) or state
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{path} is neither a checkpoint of this tool (or of FlatCLR or MetaContrastive) nor an "
                         "export (no model state, no .json)")
    weights = backbone_weights(state["model"])
    args = state.get("args", {})
    stats = args.get("input_stats") or {}
    meta = describe(state.get("arch", args.get("arch")), weights, float(state.get("width_multiplier") or 1.0),
                    method=args.get("clr"), epoch=state.get("epoch"), dataset=args.get("dataset_name"),
                    mean=stats.get("mean"), std=stats.get("std"), image_size=stats.get("image_size"),
                    source=os.path.abspath(path))
    return weights, meta


def load_pretrained(path: str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The pretrained backbone at ``path`` (run directory, checkpoint or export) in eval mode on ``map_location``,
    and its metadata (arch, cifar_stem, width_multiplier, feat_dim, and mean/std/image_size when recorded)."""
    weights, meta = read_backbone(path)
    backbone = rebuild(meta)
    backbone.load_state_dict(weights, strict=True)
    return backbone.to(map_location).eval(), meta


def load_projector(path: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """The projection head of a run's checkpoint (or a run directory's latest), rebuilt from its saved settings,
    in eval mode: the "FC/projection output" a t-SNE of the seed-001 kind draws."""
    if os.path.isdir(path):
        path = _latest_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    args, model = state.get("args", {}), state.get("model", {})
    weights = {k[len("projector."):]: v for k, v in model.items() if k.startswith("projector.")}
    if not weights and args.get("proj_head_mode", "nonlinear") != "none":
        raise ValueError(f"{path} holds no projection head (an export keeps the backbone only)")
    feat_dim = describe("", backbone_weights(model), 1.0)["feat_dim"]
    head, _ = projector_from(args, feat_dim)
    head.load_state_dict(weights, strict=True)
    return head.to(map_location).eval()
