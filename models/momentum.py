"""Momentum (EMA) target networks, as in BYOL (Grill et al. 2020, sec. 3.2) and MoCo (He et al. 2020).

A :class:`MomentumTarget` holds frozen copies of online networks, applies them in order, and follows
them with ``target <- m * target + (1 - m) * online`` after every optimizer step. The momentum ramps
from ``base_momentum`` to 1 along a cosine over the run (BYOL) or stays at the base value (``constant``).
It lives in the ``momentum`` buffer, so checkpoints hold it and logs can read it.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


class MomentumTarget(nn.Module):
    """EMA copies of ``online`` (name -> network), called as one network: children in insertion order."""

    def __init__(self, online: dict[str, nn.Module], base_momentum: float, schedule: str = "cosine") -> None:
        super().__init__()
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown momentum schedule {schedule!r}")
        for name, net in online.items():
            self.add_module(name, copy.deepcopy(net).requires_grad_(False))
        self.base_momentum = base_momentum
        self.schedule = schedule
        self.register_buffer("momentum", torch.tensor(base_momentum, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for net in self.children():
            x = net(x)
        return x

    def momentum_at(self, step: int, total_steps: int) -> float:
        """Momentum for the update after ``step`` completed steps: cosine from the base value at step 0 to 1
        at the last step, or the base value throughout."""
        if self.schedule == "constant":
            return self.base_momentum
        progress = min(step / max(total_steps, 1), 1.0)
        return 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0

    @torch.no_grad()
    def update(self, online: dict[str, nn.Module], step: int, total_steps: int) -> None:
        """EMA step towards ``online`` (the same names as at construction) with the momentum of ``step``
        (1-based count of completed optimizer steps), computed on the host: reading the buffer back from a
        GPU would synchronise every step. The buffer then holds the next step's value, for logs and checkpoints."""
        if online.keys() != self._modules.keys():
            raise ValueError(f"momentum target follows {list(self._modules)}, got {list(online)}")
        m = self.momentum_at(step - 1, total_steps)
        for name, net in online.items():
            torch._foreach_lerp_(list(self._modules[name].parameters()), list(net.parameters()), 1.0 - m)
        self.momentum.fill_(self.momentum_at(step, total_steps))
