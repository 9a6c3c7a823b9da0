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

    def momentum_at(self, step: torch.Tensor | int, total_steps: int) -> torch.Tensor:
        """Momentum (a float64 tensor on the buffer's device) for the update after ``step`` completed steps: cosine
        from the base value at step 0 to 1 at the last step, or the base value throughout. ``step`` is the
        training loop's device counter, so nothing is read back to the host and a captured step replays it."""
        if self.schedule == "constant":
            return torch.full_like(self.momentum, self.base_momentum)
        step = torch.as_tensor(step, device=self.momentum.device).to(torch.float64)
        progress = (step / max(total_steps, 1)).clamp(max=1.0)
        return 1.0 - (1.0 - self.base_momentum) * (torch.cos(math.pi * progress) + 1.0) / 2.0

    @torch.no_grad()
    def update(self, online: dict[str, nn.Module], step: torch.Tensor | int, total_steps: int) -> None:
        """EMA step towards ``online`` (the same names as at construction) with the momentum of ``step``
        (1-based count of completed optimizer steps), computed on the device. The buffer then holds the next step's
        value, for logs and checkpoints."""
        if online.keys() != self._modules.keys():
            raise ValueError(f"momentum target follows {list(self._modules)}, got {list(online)}")
        m = self.momentum_at(step - 1, total_steps)
        for name, net in online.items():
            targets, sources = list(self._modules[name].parameters()), list(net.parameters())
            _lerp_(targets, sources, (1.0 - m).to(targets[0].dtype))
        self.momentum.copy_(self.momentum_at(step, total_steps))


def _lerp_(targets: list[torch.Tensor], sources: list[torch.Tensor], weight: torch.Tensor) -> None:
    """targets += weight * (sources - targets), ``weight`` a 0-d device tensor: one fused kernel where torch has
    the tensor-weight overload of ``_foreach_lerp_``, one kernel per tensor on older builds."""
    global _FUSED_TENSOR_LERP
    if _FUSED_TENSOR_LERP is not False:
        try:
            torch._foreach_lerp_(targets, sources, weight)
            _FUSED_TENSOR_LERP = True
            return
        except (RuntimeError, TypeError):
            if _FUSED_TENSOR_LERP:  # the overload exists: a real error
                raise
            _FUSED_TENSOR_LERP = False  # decided once, not an exception every step
    for t, s in zip(targets, sources):
        t.lerp_(s, weight)


_FUSED_TENSOR_LERP: bool | None = None  # whether this torch has _foreach_lerp_ with a tensor weight
