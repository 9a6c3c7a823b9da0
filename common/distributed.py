"""torchrun-style distributed set-up and the collectives the losses need.

Without the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK) everything runs as one process and the
collectives are identities, so the same code path serves a laptop and a 64-GPU job (nanoGPT, DINO).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from common.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group that torchrun describes; nccl on CUDA, gloo on CPU."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return info


def launched_rank() -> int:
    """This process's rank as the launcher (torchrun) set it, readable before the process group exists; 0
    without a launcher."""
    return int(os.environ.get("RANK", "0"))


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Each rank's loss uses all ranks' embeddings, so the gradient for rank r's embeddings is the sum
    over ranks of d loss_k / d z_r: an all-reduce of the incoming gradient, then rank r's slice.
    (Returning only the local slice of the local gradient, the common mistake, drops the
    contributions of the other ranks' losses; lightly issue #1528.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * n : (rank + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank in rank order, keeping the gradient path to every rank."""
    return _GatherWithGrad.apply(x) if is_dist() else x


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank in rank order (no gradient)."""
    if not is_dist():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; identity in one process."""
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def broadcast_tensor(x: torch.Tensor, src: int) -> torch.Tensor:
    """In place: rank ``src``'s ``x`` on every rank (each rank passes a tensor of the same shape and dtype);
    identity in one process."""
    if is_dist():
        dist.broadcast(x, src=src)
    return x


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def on_main_only(work: Callable[[], object]) -> object:
    """Rank 0's file work, whose failure must reach every rank (see ``shared_outcome``) instead of leaving
    the others waiting in a collective: returns the result, or the exception."""
    try:
        return work()
    except Exception as err:  # noqa: BLE001 - handed to every rank by shared_outcome
        return err


def shared_outcome(outcome: object) -> object:
    """Rank 0's result on every rank; when it is an exception, every rank raises it (a user error as itself,
    anything else as the one-line error it would have been on rank 0 alone)."""
    outcome = broadcast_object(outcome if not isinstance(outcome, Exception) or isinstance(outcome, UserError)
                               else UserError(f"rank 0 failed writing the run: {type(outcome).__name__}: {outcome}"))
    if isinstance(outcome, Exception):
        raise outcome
    return outcome
