"""Will a pretraining step fit the device? Estimated before anything is allocated, so that a batch that cannot fit
ends in one line naming the estimate and the flag to change, instead of an out-of-memory error minutes later.

The activations are what autograd keeps for the backward: the backbone is run once on the ``meta`` device (no
memory, no compute) under ``saved_tensors_hooks`` and the tensors it saves are added up, parameters excepted.
Checked against real tensors on the CPU (the difference between batches of 4 and 2): ResNet-50 at 224 px 86.3
vs 85.9 MB an image, ResNet-18 at 224 px 22.3 vs 22.2, ResNet-18 at 32 px (CIFAR stem) 4.8 vs 4.7. Under bf16
autocast the same measurement gave 0.51 (ResNet-50) and 0.54 (ResNet-18) of the fp32 figure: ``HALF`` below.
``benchmarks/memory_estimate.py`` repeats the comparison.
"""
from __future__ import annotations

import functools
import os
from argparse import Namespace

import torch
import torch.nn as nn

from common.errors import UserError

HALF = 0.55  # activations under bf16/fp16 autocast, as a fraction of fp32's (measured 0.51-0.54)
GiB = 2**30


def activation_bytes(backbone: nn.Module, image_size: int) -> int:
    """Bytes autograd saves for the backward of one image through ``backbone`` (built on the meta device)."""
    params = {id(p) for p in backbone.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in params:
            saved[id(t)] = t.numel() * t.element_size()
        return t

    x = torch.empty(2, 3, image_size, image_size, device="meta")  # 2: BatchNorm refuses one 1x1 map in training
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backbone.train()(x)
    return sum(saved.values()) // 2


def device_memory(device: torch.device) -> int:
    """Bytes of memory of the training device: the GPU's, or the machine's for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@functools.lru_cache(maxsize=64)
def backbone_activation_bytes(arch: str, cifar_stem: bool, width: float, image_size: int) -> int:
    """``activation_bytes`` of a backbone, once per process for each shape (runs in one process repeat it)."""
    from models.backbones import build_backbone

    with torch.device("meta"):
        backbone, _ = build_backbone(arch, cifar_stem, width)
    return activation_bytes(backbone, image_size)


def step_estimate(cfg: Namespace, num_data: int, image_size: int, cifar_stem: bool, world_size: int) -> dict:
    """Activations of one micro-batch and the state (weights, gradients, optimizer, buffers) of the method."""
    from models import build_method

    with torch.device("meta"):
        method = build_method(cfg, num_data=num_data, cifar_stem=cifar_stem)
    per_image = backbone_activation_bytes(cfg.arch, cifar_stem, cfg.width_multiplier, image_size)
    if cfg.precision in ("bf16", "fp16"):
        per_image = int(per_image * HALF)
    micro = cfg.batch_size // world_size // cfg.accu_iter
    trainable = sum(p.numel() * p.element_size() for p in method.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in method.buffers())
    moments = 2 if cfg.optimizer in ("adam", "adamw") else 1
    return {"per_image": per_image, "micro": micro, "views": cfg.n_views,
            "activations": per_image * micro * cfg.n_views, "state": trainable * (2 + moments) + buffers}


def check_fits(cfg: Namespace, num_data: int, image_size: int, cifar_stem: bool, world_size: int,
               device: torch.device) -> None:
    """Refuse a step that cannot fit the device, naming the estimate and what to change."""
    est = step_estimate(cfg, num_data, image_size, cifar_stem, world_size)
    have = device_memory(device)
    need = est["activations"] + est["state"]
    if need <= have:
        return
    room = have - est["state"]
    fits = max(1, int(room // max(est["per_image"] * est["views"], 1))) if room > 0 else 0
    per_device = cfg.batch_size // world_size
    accu = next((k for k in range(cfg.accu_iter + 1, per_device + 1)
                 if per_device % k == 0 and per_device // k <= fits), None)
    fixes = []
    if cfg.precision == "fp32":
        fixes.append("--precision bf16 (about half the activations)")
    if accu is not None:
        fixes.append(f"--accu_iter {accu} (micro-batches of {per_device // accu}, the same global batch)")
    fixes.append("more processes (torchrun) or a smaller --batch_size")
    where = f"{torch.cuda.get_device_name(device)}'s" if device.type == "cuda" else "this machine's"
    raise UserError(f"a step needs about {need / GiB:.1f} GiB ({est['activations'] / GiB:.1f} GiB of {cfg.precision} "
                    f"activations for {est['micro']} images x {est['views']} views of {image_size} px through "
                    f"{cfg.arch}, {est['state'] / GiB:.1f} GiB of weights, gradients and optimizer state), more than "
                    f"{where} {have / GiB:.1f} GiB; pass " + ", or ".join(fixes))
