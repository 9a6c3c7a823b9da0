"""Which device a process trains on."""
from __future__ import annotations

import os

import torch

from common.errors import UserError


def pick_device(kind: str) -> torch.device:
    """``kind`` is ``--device``: auto (CUDA when visible), cpu or cuda. Under torchrun each process takes
    the GPU of its LOCAL_RANK."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
