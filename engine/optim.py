"""Optimizers and learning-rate schedules.

LARS (You et al. 2017, as used by SimCLR and BYOL): SGD with momentum whose per-tensor step is
scaled by the trust ratio eta * ||w|| / (||g|| + wd * ||w||). Biases and batch-norm parameters are
excluded from both weight decay and adaptation (SimCLR appendix B.1; FlatCLR passed the exclusion
list by name to ``model.parameters()``, which has no names, so nothing was ever excluded).
Everything is tensor arithmetic with foreach ops: no ``.item()``, no host sync per parameter.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn


# The base lr when --lr is not given: FlatCLR README's table (0.3 x bs/256, or 0.075 x sqrt(bs) for small
# batches); AdamW's own scale.
DEFAULT_BASE_LR = {"linear": 0.3, "sqrt": 0.075, "none": 0.3}
ADAMW_BASE_LR = 1e-3


def default_lr(optimizer: str, scaling: str) -> float:
    return ADAMW_BASE_LR if optimizer == "adamw" else DEFAULT_BASE_LR[scaling]


def scaled_lr(base_lr: float, batch_size: int, scaling: str) -> float:
    """FlatCLR / SimCLR learning-rate scaling with the *global* batch size."""
    if scaling == "linear":
        return base_lr * batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if scaling == "none":
        return base_lr
    raise ValueError(f"unknown learning-rate scaling {scaling!r}")


def lr_schedule(peak: float, total_steps: int, warmup_steps: int, kind: str) -> np.ndarray:
    """Per-step learning rates: linear warmup from 0, then cosine to 0 (or constant)."""
    steps = np.arange(total_steps, dtype=np.float64)
    warm = peak * (steps + 1) / max(warmup_steps, 1)
    if kind == "cosine":
        decay_len = max(total_steps - warmup_steps, 1)
        main = peak * 0.5 * (1 + np.cos(np.pi * (steps - warmup_steps) / decay_len))
    elif kind == "constant":
        main = np.full_like(steps, peak)
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return np.where(steps < warmup_steps, warm, main)


WARMUP_CAP_FRACTION = 0.1  # a warmup as long as the run or longer becomes this fraction of it


@dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule of a run, in optimizer steps; recorded in config.yaml and checkpoints."""

    kind: str
    peak_lr: float
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    requested_warmup_steps: int  # what --warmup_epochs asked for, before any cap

    def rates(self) -> np.ndarray:
        return lr_schedule(self.peak_lr, self.total_steps, self.warmup_steps, self.kind)

    def record(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"schedule: peak lr {self.peak_lr:.6g}, {self.warmup_steps} warmup step(s) of {self.total_steps} "
                f"({self.steps_per_epoch} per epoch), then {self.kind}")


def plan_schedule(*, peak_lr: float, kind: str, epochs: int, steps_per_epoch: int, warmup_epochs: int,
                  cap_warmup: bool = True, saved: dict | None = None,
                  total_steps: int | None = None) -> tuple[Schedule, str | None]:
    """The run's schedule and, when the warmup was capped, the one line that says so.

    A warmup as long as the run or longer would reach the peak lr only at the last step or never; unless
    ``cap_warmup`` is off it becomes ``WARMUP_CAP_FRACTION`` of the run (at least one step). ``saved`` is the
    schedule recorded in the checkpoint a run resumes from: a run started before this rule existed keeps its
    uncapped warmup as long as its schedule settings are unchanged, and a resume repeats no note. ``total_steps``
    (--iters) ends the run before its last epoch does.
    """
    total = total_steps if total_steps is not None else epochs * steps_per_epoch
    requested = warmup_epochs * steps_per_epoch
    warmup, note = requested, None
    started_before_cap = (saved is not None and "requested_warmup_steps" not in saved
                          and (saved.get("kind"), saved.get("total_steps"), saved.get("warmup_steps")) == (kind, total,
                                                                                                         requested)
                          and math.isclose(saved.get("peak_lr", math.nan), peak_lr, rel_tol=1e-12))
    if cap_warmup and 0 < total <= requested and not started_before_cap:
        warmup = max(1, round(WARMUP_CAP_FRACTION * total))
        note = (f"note: --warmup_epochs {warmup_epochs} ({requested} steps) is as long as the run ({total} steps) "
                f"or longer, so the peak lr would be reached only at the last step or never; warming up over "
                f"{warmup} step(s) instead ({warmup / total:.0%} of the run). Pass --no-cap_warmup to keep the full "
                "warmup")
    schedule = Schedule(kind, peak_lr, total, warmup, steps_per_epoch, requested)
    if saved is not None and saved.get("warmup_steps") == warmup and saved.get("total_steps") == total:
        note = None  # the run was told when it started
    return schedule, note


def param_groups(model: nn.Module, weight_decay: float, decay_bias_and_norm: bool = False) -> list[dict]:
    """Weights get decay and LARS adaptation; biases and norm parameters (1-D tensors) get neither (SimCLR's
    rule), or decay too with ``decay_bias_and_norm`` (plain SGD/AdamW in other libraries)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_adapt": True},
        {"params": no_decay, "weight_decay": weight_decay if decay_bias_and_norm else 0.0, "lars_adapt": False},
    ]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling on top of SGD with (heavy-ball) momentum."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd = group["weight_decay"]
            if group["lars_adapt"]:
                # all layers' trust ratios in a handful of kernels (one per layer cost ~5 ms a step on an H100)
                w = torch.stack(torch._foreach_norm(params))
                g = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((w > 0) & (g > 0), group["eta"] * w / (g + wd * w), torch.ones_like(w)).unbind()
            if wd:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if group["lars_adapt"]:
                grads = torch._foreach_mul(grads, trust)
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, momentum: float,
                    decay_bias_and_norm: bool = False):
    groups = param_groups(model, weight_decay, decay_bias_and_norm)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for g in groups:
        g.pop("lars_adapt")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")
