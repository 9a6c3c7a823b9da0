"""One optimizer step of any method: forward (micro-batches with ``--accu_iter``), the finite and runaway checks
all ranks agree on, backward, the step with the scheduled lr, and ``after_step`` with the step's outputs."""
from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from common.distributed import all_reduce_sum, get_world_size, shared_outcome
from common.errors import UserError
from data.rotation import rotate, step_generator, task_rotations
from losses.diagnostics import COLLAPSE_RANK, COLLAPSE_WINDOWS

if TYPE_CHECKING:
    from engine.probe import OnlineProbe


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# One optimizer step never grows the trainable weights' total norm this much in a sound run (LARS moves each
# layer by lr * eta of its norm, SGD/AdamW by lr-sized steps); e.g. --lr 1e30 grows it ~1e27-fold and leaves a
# finite loss behind (normalised embeddings hide the scale), so only this check stops it.
MAX_STEP_GROWTH = 10.0


class _StepCheck:
    """Once per step, every rank learns together whether any rank's loss is NaN or inf (then all stop before
    the optimizer step), whether the previous update was a runaway (non-finite weights, or their norm grown
    more than ``MAX_STEP_GROWTH``-fold: ``Trainer.runaway``), and whether any rank asks to stop (a signal) or
    to save (a timer) after it.

    Also whether rank 0's background checkpoint write failed (``save_failed`` after ``wait``).

    Made right after the forward: it queues one all-reduce of six numbers and their copy to the host
    without waiting. ``wait`` is called once the backward has been queued, so on CUDA the host waits for the
    forward while the device runs the backward, instead of draining the stream every step. The requests are
    filled on the device from host scalars (no host-to-device copy).
    """

    def __init__(self, loss: torch.Tensor, stop: bool, save: bool,
                 runaway: tuple[torch.Tensor, torch.Tensor] | None = None, update_step: int = 0,
                 weights_finite: Callable[[], bool] = lambda: True, save_failed: bool = False) -> None:
        self.update_step = update_step  # the run's step count of the update ``runaway`` judges
        self.weights_finite = weights_finite  # asked only to word the error (a host sync on that path alone)
        zero = torch.zeros((), device=loss.device)
        runaway = runaway if runaway is not None else (zero, zero)
        flags = torch.stack([(~torch.isfinite(loss.detach())).float().reshape(()),
                             torch.full((), float(stop), device=loss.device),
                             torch.full((), float(save), device=loss.device), *(t.float() for t in runaway),
                             torch.full((), float(save_failed), device=loss.device)])
        flags = all_reduce_sum(flags)
        self.counts = flags.to("cpu", non_blocking=True)  # from CUDA: pinned memory, valid once `ready` has passed
        self.ready = None
        if flags.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def wait(self, epoch: int, step: int, last_ckpt: str | None) -> tuple[bool, bool]:
        """Raises if any rank's loss is not finite or the last update ran away; returns (stop requested, save
        requested) on any rank."""
        if self.ready is not None:
            self.ready.synchronize()
        bad, stop, save, runaway, growth, failed = self.counts.tolist()
        self.save_failed = failed > 0
        if self.save_failed:  # the caller raises the write's error first: it is what the user must fix
            return stop > 0, save > 0
        where = f"resume from {last_ckpt} " if last_ckpt else ""
        if runaway:
            raise UserError(runaway_message(growth / get_world_size(), not self.weights_finite(),
                                            f"step {self.update_step} of the run", where))
        if bad:
            raise UserError(f"loss is not finite at epoch {epoch + 1}, step {step + 1} on {int(bad)} rank(s); "
                            f"nothing was stepped or saved: lower --lr or use --precision fp32, then {where}"
                            "rerun")
        return stop > 0, save > 0


def runaway_message(growth: float, nonfinite: bool, where_step: str, resume: str) -> str:
    what = ("made the weights not finite" if nonfinite
            else f"grew the weights' norm {growth:.3g}-fold (more than {MAX_STEP_GROWTH:g}-fold is a runaway)"
            if math.isfinite(growth) else "grew the weights' norm past the float32 range (a runaway)")
    return (f"the update of {where_step} {what}; nothing was saved: lower --lr or use --precision fp32, then "
            f"{resume}rerun")


@dataclass
class StepParts:
    """What a :class:`Trainer` steps, and how: the networks (``model`` runs the forward, DDP-wrapped or compiled;
    ``method`` is the unwrapped module that owns ``after_step`` and the state saved in checkpoints), the optimizer,
    the lr of every step of the run (``schedule``), and the settings a step reads."""

    model: nn.Module
    method: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: np.ndarray | torch.Tensor
    device: torch.device
    scaler: torch.amp.GradScaler | None = None  # None: no loss scaling (anything but fp16)
    precision: str = "fp32"
    memory_format: torch.memory_format = torch.contiguous_format
    rot_task_p: float = 0.0
    seed: int = 0
    rank: int = 0
    accu_iter: int = 1
    probe: OnlineProbe | None = None  # --online_probe: trained after each step on the features the step kept


class Trainer:
    """Optimizer steps of any method: forward under autocast, checks, backward, step, method hook.

    ``parts``: what it steps (:class:`StepParts`). ``step`` counts completed optimizer steps.
    ``requests(next_step) -> (stop, save)`` are this rank's wishes; after a step, ``stop_now``/``save_now``
    say what the ranks agreed on.
    """

    def __init__(self, parts: StepParts, *, step: int = 0, last_ckpt: str | None = None,
                 requests: Callable[[int], tuple[bool, bool]] | None = None,
                 save_failure: Callable[[], BaseException | None] = lambda: None) -> None:
        p = parts
        self.model, self.method, self.optimizer, self.schedule = p.model, p.method, p.optimizer, p.schedule
        self.scaler = p.scaler if p.scaler is not None else torch.amp.GradScaler(p.device.type, enabled=False)
        self.rot_task_p, self.seed, self.rank, self.accu_iter = p.rot_task_p, p.seed, p.rank, p.accu_iter
        self.device, self.memory_format, self.probe = p.device, p.memory_format, p.probe
        self.autocast = (torch.autocast(p.device.type, dtype=DTYPES[p.precision]) if p.precision in DTYPES
                         else nullcontext())
        self.total_steps, self.step, self.last_ckpt = len(p.schedule), step, last_ckpt
        # the completed steps on the device, counted in place: what after_step and the rotation task's progress read
        self.step_count = torch.tensor(step, dtype=torch.long, device=p.device)
        self.requests = requests or (lambda next_step: (False, False))
        self.save_failure, self._failure = save_failure, None  # a finished background write's failure
        self.stop_now = self.save_now = False
        self.params = [w for g in self.optimizer.param_groups for w in g["params"]]
        self.norm = self._weights_norm()
        # (flag, growth) of the last update, device scalars
        self.runaway: tuple[torch.Tensor, torch.Tensor] | None = None
        self.low_rank_windows, self.warned_collapse = 0, False
        self.peak_lr = float(p.schedule.max()) if len(p.schedule) else 0.0

    def _weights_norm(self) -> torch.Tensor:
        """The trainable weights' total norm, as a device scalar (a fused kernel or two, no host sync)."""
        return torch.stack(torch._foreach_norm(self.params)).norm() if self.params else torch.ones(())

    def watch_collapse(self, values: dict, say: bool) -> None:
        """One warning when the effective rank of the embeddings stays under COLLAPSE_RANK for
        COLLAPSE_WINDOWS logging windows in a row."""
        if "erank" not in values:
            return
        self.low_rank_windows = self.low_rank_windows + 1 if values["erank"] < COLLAPSE_RANK else 0
        if self.low_rank_windows == COLLAPSE_WINDOWS and not self.warned_collapse:
            self.warned_collapse = True
            if say:
                tqdm.write(f"warning: the embeddings look collapsed: effective rank {values['erank']:.2f} (under "
                           f"{COLLAPSE_RANK:g}) for {COLLAPSE_WINDOWS} logging windows by step {self.step}; check the "
                           "BN switches, the learning rate and the EMA momentum", file=sys.stderr)

    def _grad_norm(self) -> torch.Tensor:
        """The trainable weights' gradient norm (unscaled first under fp16), a device scalar."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)  # scaler.step then uses these unscaled gradients
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.stack(torch._foreach_norm(grads)).norm() if grads else torch.zeros((), device=self.device)

    def _judge_update(self) -> None:
        """After a step: ``runaway`` says on the device whether it grew the weights' norm more than
        ``MAX_STEP_GROWTH``-fold or made them NaN/inf (a NaN or inf weight makes the norm NaN or inf, which fails
        the comparison): one pass over the weights a step."""
        norm = self._weights_norm()
        growth = norm / self.norm
        self.runaway = (~(growth <= MAX_STEP_GROWTH), growth)
        self.norm = norm

    def weights_finite(self) -> bool:
        """Whether every trainable weight is finite: words a runaway's error (the norm can overflow while the
        weights stay finite); a host sync, on that path only."""
        return all(bool(torch.isfinite(p).all()) for p in self.params)

    @property
    def lr(self) -> float:
        """The learning rate of the next step (of the last one once the run is complete)."""
        return float(self.schedule[min(self.step, len(self.schedule) - 1)])

    def train_step(self, views: list[torch.Tensor], index: torch.Tensor, epoch: int, i: int,
                   mark: Callable[[str], None] | None = None, diagnose: bool = False) -> dict:
        """One optimizer step on a batch; returns its logs as device tensors (no host sync).
        ``mark(phase)`` is called as each phase ends (forward, backward, optimizer): the profiler's hook.
        ``diagnose`` (the logging steps) adds the diagnostics of losses/diagnostics.py and the gradient norm."""
        mark = mark or (lambda phase: None)
        views = [v.to(self.device, non_blocking=True, memory_format=self.memory_format) for v in views]
        index = index.to(self.device, non_blocking=True)
        if self.rot_task_p or self.method.rot_head is not None:
            views = self._rotations(views, epoch, i)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        k = self.accu_iter  # micro-batches of this step: averaged losses, one gradient all-reduce (the last)
        parts = [v.tensor_split(k) for v in views] if k > 1 else [[v] for v in views]
        indices = index.tensor_split(k) if k > 1 else [index]
        losses, chunk_logs, chunk_outputs = [], [], []
        for m in range(k):
            self.method.diagnose = diagnose
            with self._no_sync() if m < k - 1 else nullcontext():
                try:
                    with self.autocast:
                        loss, logs, outputs = self.model([p[m] for p in parts], indices[m])
                finally:
                    self.method.diagnose = False
                losses.append(loss.detach())
                chunk_logs.append(logs)
                chunk_outputs.append(outputs)
                if m == k - 1:  # the step's check overlaps the last backward, as without accumulation
                    loss_value = losses[0] if k == 1 else torch.stack(losses).mean()
                    self._failure = self._failure or self.save_failure()
                    check = _StepCheck(loss_value, *self.requests(self.step + 1), runaway=self.runaway,
                                       update_step=self.step, weights_finite=self.weights_finite,
                                       save_failed=self._failure is not None)
                    mark("forward")
                self.scaler.scale(loss if k == 1 else loss / k).backward()
        logs = chunk_logs[0] if k == 1 else {key: torch.stack([c[key].float() for c in chunk_logs]).mean()
                                             for key in chunk_logs[0]}
        mark("backward")
        self.stop_now, self.save_now = check.wait(epoch, i, self.last_ckpt)
        if check.save_failed:  # every rank stops with rank 0's error, before this step changes anything
            shared_outcome(self._failure if self.rank == 0 else None)
        if diagnose:
            logs["grad_norm"] = self._grad_norm()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.step_count.add_(1)
        self._judge_update()
        outputs = chunk_outputs[0] if k == 1 else {key: torch.cat([c[key] for c in chunk_outputs])
                                                   for key in chunk_outputs[0]}
        self.method.after_step(self.step_count, self.total_steps, outputs)
        if self.probe is not None:  # its own optimizer, at the pretraining schedule's fraction of its peak
            fraction = float(self.schedule[self.step - 1]) / self.peak_lr if self.peak_lr > 0 else 1.0
            logs.update(self.probe.step(outputs["backbone_features"], index, fraction))
        mark("optimizer")
        return {"loss": loss_value.float(), **{key: v.float() for key, v in logs.items()}}

    def _rotations(self, views: list[torch.Tensor], epoch: int, i: int) -> list[torch.Tensor]:
        """The step's rotations (data/rotation.py): the views of --rot_task_p, and the generator and progress of
        the rotation prediction."""
        g = step_generator(self.seed, epoch, i, self.rank, self.device)
        if self.rot_task_p:  # all views of an image turned by its one k: a new instance-class of the task
            turns = task_rotations(views[0].shape[0], self.rot_task_p, g, self.device)
            views = [rotate(v, turns) for v in views]
        self.method.step_generator = g
        if self.method.rot_head is not None:  # a tensor: no recompile under --compile
            self.method.progress.copy_(self.step_count / max(self.total_steps, 1))
        return views

    def _no_sync(self):
        """DDP's no_sync (no gradient all-reduce) for the micro-batches before a step's last; nothing in one process."""
        ddp = getattr(self.model, "_orig_mod", self.model)  # under torch.compile
        return ddp.no_sync() if isinstance(ddp, nn.parallel.DistributedDataParallel) else nullcontext()

