"""Self-supervised pretraining: one loop for every method.

views -> method(views, index) -> loss (negatives gathered from every rank inside the method) ->
finite check on all ranks -> backward -> optimizer step with the per-step LR -> method.after_step
(BYOL EMA, InsDis bank) -> metrics; a checkpoint every ``--save_every_n_epochs`` and at the end.

Reading order: :func:`pretrain` (set-up, then the epochs), :class:`Trainer` (one step),
:func:`train_epoch` (one pass with progress and logs), :func:`end_epoch` (monitor, metrics, checkpoint).
"""
from __future__ import annotations

import os
import sys
import time
from argparse import Namespace
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from common.device import pick_device
from common.distributed import (DistInfo, all_gather_object, all_reduce_sum, barrier, broadcast_object,
                                init_distributed)
from common.errors import UserError
from data.augment import default_blur
from data.datasets import Split, load_split
from data.loaders import pretrain_loader
from engine import checkpoint as ckpt_io
from engine.knn import KnnMonitor
from engine.optim import build_optimizer, plan_schedule, scaled_lr
from engine.runlog import Meter, MetricsLog, new_run_dir, plot_curves, write_config
from models import METHODS, build_method

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pretrain(cfg: Namespace, resume: dict | None = None, resume_path: str | None = None) -> str:
    """Run (or continue) pretraining; returns the run directory."""
    device = pick_device(cfg.device)
    dist = init_distributed(device.type)
    check_setup(cfg, dist, device)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    split = load_split(cfg.dataset_name, cfg.data, train=True, download=cfg.download, pretrain=True,
                       image_size=cfg.image_size)
    loader, epoch_setters = build_loader(cfg, split, dist, device)
    method, memory_format = build_model(cfg, split, dist, device)

    steps_per_epoch = len(loader) if cfg.limit_train_batches is None else min(len(loader), cfg.limit_train_batches)
    schedule, note = plan_schedule(peak_lr=scaled_lr(cfg.lr, cfg.batch_size, cfg.learning_rate_scaling),
                                   kind=cfg.scheduler, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                                   warmup_epochs=cfg.warmup_epochs, cap_warmup=cfg.cap_warmup is not False,
                                   saved=resume.get("scheduler") if resume is not None else None)
    optimizer = build_optimizer(cfg.optimizer, method, schedule.peak_lr, cfg.weight_decay, cfg.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    start_epoch, step = 0, 0
    if resume is not None:
        start_epoch, step = ckpt_io.restore(resume, resume_path, method, optimizer, scaler, steps_per_epoch)
    model = wrap_model(method, cfg, dist, device)

    run_dir = prepare_run_dir(cfg, dist, resuming=resume is not None)
    writer = metrics = None
    if dist.is_main:
        write_config(run_dir, {**vars(cfg), "schedule": schedule.record()})
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run_dir, purge_step=step if resume else None)
        metrics = MetricsLog(run_dir, resume_epoch=start_epoch if resume else None)
        print(f"run directory: {run_dir}", flush=True)
        print(schedule.describe() + (f"\n{note}" if note else ""), flush=True)
    if resume is not None:
        ckpt_io.restore_rng(resume, dist)
    monitor = None
    if cfg.eval_every_n_epochs:
        monitor = KnnMonitor(cfg.dataset_name, cfg.data, split.image_size, device, cfg.workers, cfg.knn_k,
                             cfg.knn_temperature, cfg.download)

    last_epoch = cfg.epochs if cfg.stop_after_epoch is None else min(cfg.epochs, cfg.stop_after_epoch)
    if start_epoch >= last_epoch and dist.is_main:
        print(f"nothing to do: the run has completed {start_epoch} of {cfg.epochs} epochs")
    trainer = Trainer(model, method, optimizer, scaler, schedule.rates(), device=device, precision=cfg.precision,
                      memory_format=memory_format, total_steps=schedule.total_steps, step=step,
                      last_ckpt=resume_path)
    for epoch in range(start_epoch, last_epoch):
        for target in epoch_setters:
            target.set_epoch(epoch)
        record = train_epoch(trainer, loader, epoch, steps_per_epoch, cfg, dist, writer)
        end_epoch(trainer, record, cfg, dist, run_dir, writer, metrics, monitor, last_epoch, schedule.record())
    barrier()
    if writer is not None:
        writer.close()
        print(f"done: {last_epoch} of {cfg.epochs} epochs; checkpoints, metrics.jsonl, curves.png and "
              f"TensorBoard events are in {run_dir}", flush=True)
    return run_dir


# ----------------------------------------------------------------------------- set-up
def check_setup(cfg: Namespace, dist: DistInfo, device: torch.device) -> None:
    """Refuse settings this process group or device cannot run."""
    if cfg.batch_size % dist.world_size:
        raise UserError(f"--batch_size {cfg.batch_size} (global) does not divide over {dist.world_size} "
                        "processes; pick a multiple of the world size")
    if cfg.precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device; use --precision bf16 or fp32 on CPU")
    if use_sync_bn(cfg, dist, device) and device.type != "cuda":
        raise UserError("--sync_bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU); "
                        "drop it or pass --no-sync_bn")


def use_sync_bn(cfg: Namespace, dist: DistInfo, device: torch.device) -> bool:
    """SyncBatchNorm across ranks: --sync_bn, by default on for multi-GPU runs; never for one process."""
    return dist.enabled and (cfg.sync_bn if cfg.sync_bn is not None else device.type == "cuda")


def build_loader(cfg: Namespace, split: Split, dist: DistInfo, device: torch.device):
    """The pretraining loader with the method's view recipe; returns (loader, things to set_epoch on)."""
    blur = cfg.blur if cfg.blur is not None else default_blur(split.image_size)
    views = METHODS[cfg.clr].views(cfg.n_views, blur)
    return pretrain_loader(split, views, cfg.batch_size, cfg.seed, dataset_name=cfg.dataset_name, rank=dist.rank,
                           world_size=dist.world_size, workers=cfg.workers, device=device, faster=cfg.faster_version,
                           jitter_strength=cfg.color_jitter_strength, min_crop_scale=cfg.min_crop_scale)


def build_model(cfg: Namespace, split: Split, dist: DistInfo, device: torch.device):
    """The method on its device (SyncBatchNorm across GPUs, NHWC unless --no-channels_last)."""
    cifar_stem = cfg.cifar_stem if cfg.cifar_stem is not None else split.image_size <= 64
    method = build_method(cfg, num_data=len(split.dataset), cifar_stem=cifar_stem)
    if use_sync_bn(cfg, dist, device):
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    # on unless --no-channels_last (older runs saved None)
    memory_format = torch.channels_last if cfg.channels_last is not False else torch.contiguous_format
    return method.to(device, memory_format=memory_format), memory_format


def wrap_model(method: nn.Module, cfg: Namespace, dist: DistInfo, device: torch.device) -> nn.Module:
    """DDP across ranks, then torch.compile when asked; the unwrapped method stays what is saved."""
    model = method
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return torch.compile(model) if cfg.compile else model


def prepare_run_dir(cfg: Namespace, dist: DistInfo, resuming: bool) -> str:
    """Rank 0 picks (and creates) the run directory; every rank gets the same path."""
    run_dir = None
    if dist.is_main:
        if cfg.log_dir:
            run_dir = cfg.log_dir
            if not resuming and ckpt_io.list_checkpoints(run_dir):
                run_dir = UserError(f"{run_dir} already holds checkpoints; resume it with --train_from latest "
                                    "or choose another --log_dir")
            else:
                os.makedirs(run_dir, exist_ok=True)
        else:
            run_dir = new_run_dir(cfg.results_dir, cfg.dataset_name, cfg.batch_size, METHODS[cfg.clr].display)
    run_dir = broadcast_object(run_dir)
    if isinstance(run_dir, UserError):
        raise run_dir
    return run_dir


# ----------------------------------------------------------------------------- one step
class _LossCheck:
    """Stops every rank together, before the optimizer step, when any rank's loss is NaN or inf.

    Made right after the forward: it queues the all-reduce of the count and its copy to the host without
    waiting. ``raise_if_any`` is called once the backward has been queued, so on CUDA the host waits
    for the forward while the device runs the backward, instead of draining the stream every step.
    """

    def __init__(self, loss: torch.Tensor) -> None:
        bad = all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1))
        self.count = bad.to("cpu", non_blocking=True)  # from CUDA: pinned memory, valid once `ready` has passed
        self.ready = None
        if bad.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def raise_if_any(self, epoch: int, step: int, last_ckpt: str | None) -> None:
        if self.ready is not None:
            self.ready.synchronize()
        bad = int(self.count.item())
        if bad:
            where = f"resume from {last_ckpt} " if last_ckpt else ""
            raise UserError(f"loss is not finite at epoch {epoch + 1}, step {step + 1} on {bad} rank(s); "
                            f"nothing was stepped or saved: lower --lr or use --precision fp32, then {where}"
                            "rerun")


def _no_mark(phase: str) -> None:
    """Default of Trainer.train_step's ``mark``: no phase timing."""


class Trainer:
    """Optimizer steps of any method: forward under autocast, finite check, backward, step, method hook.

    ``model`` is what runs the forward (DDP/compiled); ``method`` the unwrapped module that owns
    ``after_step`` and the state saved in checkpoints. ``step`` counts completed optimizer steps.
    """

    def __init__(self, model: nn.Module, method: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, schedule: np.ndarray, *, device: torch.device, precision: str,
                 memory_format: torch.memory_format, total_steps: int, step: int, last_ckpt: str | None) -> None:
        self.model, self.method, self.optimizer, self.scaler, self.schedule = model, method, optimizer, scaler, schedule
        self.device, self.memory_format = device, memory_format
        self.autocast = torch.autocast(device.type, dtype=DTYPES[precision]) if precision in DTYPES else nullcontext()
        self.total_steps, self.step, self.last_ckpt = total_steps, step, last_ckpt

    @property
    def lr(self) -> float:
        """The learning rate of the next step (of the last one once the run is complete)."""
        return float(self.schedule[min(self.step, len(self.schedule) - 1)])

    def train_step(self, views: list[torch.Tensor], index: torch.Tensor, epoch: int, i: int,
                   mark: Callable[[str], None] = _no_mark) -> dict:
        """One optimizer step on a batch; returns its logs as device tensors (no host sync).
        ``mark(phase)`` is called as each phase ends (forward, backward, optimizer): the profiler's hook."""
        views = [v.to(self.device, non_blocking=True, memory_format=self.memory_format) for v in views]
        index = index.to(self.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        with self.autocast:
            loss, logs = self.model(views, index)
        check = _LossCheck(loss)
        mark("forward")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        mark("backward")
        check.raise_if_any(epoch, i, self.last_ckpt)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.method.after_step(self.step, self.total_steps)
        mark("optimizer")
        return {"loss": loss.detach().float(), **{k: v.float() for k, v in logs.items()}}


# ----------------------------------------------------------------------------- one epoch
def train_epoch(trainer: Trainer, loader, epoch: int, steps: int, cfg: Namespace, dist: DistInfo, writer) -> dict:
    """One pass of ``steps`` batches with a progress bar and windowed logs; returns the epoch's record."""
    trainer.model.train()
    epoch_meter, window = Meter(), Meter()
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not dist.is_main, dynamic_ncols=True,
               leave=True, file=sys.stdout)
    t_epoch = t_window = time.perf_counter()
    lr_max = 0.0
    for i, (views, index) in enumerate(loader):
        if i >= steps:
            break
        lr = trainer.lr
        lr_max = max(lr_max, lr)
        logs = trainer.train_step(views, index, epoch, i)
        epoch_meter.add(logs)
        window.add(logs)
        bar.update(1)
        if window.count == cfg.log_every_n_steps or i == steps - 1:
            now = time.perf_counter()
            ips = window.count * cfg.batch_size / max(now - t_window, 1e-9)
            values = window.means()
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}")
            if writer is not None:
                for k, v in {**values, "lr": lr, "images_per_s": ips}.items():
                    writer.add_scalar(f"train/{k}", v, trainer.step)
            window = Meter()
            t_window = now
    bar.close()
    epoch_time = time.perf_counter() - t_epoch
    return {"epoch": epoch + 1, "step": trainer.step, **epoch_meter.means(),
            "lr": float(trainer.schedule[min(trainer.step, len(trainer.schedule)) - 1]), "lr_max": lr_max,
            "epoch_time_s": epoch_time, "images_per_s": steps * cfg.batch_size / epoch_time}


def end_epoch(trainer: Trainer, record: dict, cfg: Namespace, dist: DistInfo, run_dir: str, writer,
              metrics: MetricsLog | None, monitor: KnnMonitor | None, last_epoch: int, schedule: dict) -> None:
    """kNN monitor, metrics line, and (every --save_every_n_epochs and at the end) checkpoint and curves."""
    completed = record["epoch"]
    if monitor is not None and completed % cfg.eval_every_n_epochs == 0:
        record["knn_top1"] = monitor(trainer.method.backbone)
        if writer is not None:
            writer.add_scalar("monitor/knn_top1", record["knn_top1"], trainer.step)
            tqdm.write(f"epoch {completed}: kNN top-1 {record['knn_top1']:.2f}% on the test split")
    rng = all_gather_object(ckpt_io.rng_state())
    if dist.is_main:
        metrics.append(record)
        if completed % cfg.save_every_n_epochs == 0 or completed in (cfg.epochs, last_epoch):
            trainer.last_ckpt = os.path.join(run_dir, ckpt_io.checkpoint_name(completed))
            state = ckpt_io.training_state(epoch=completed, step=trainer.step, method=trainer.method,
                                           optimizer=trainer.optimizer, scaler=trainer.scaler, schedule=schedule,
                                           rng=rng, args=vars(cfg))
            ckpt_io.atomic_save(state, trainer.last_ckpt)
            plot_curves(metrics.read(), os.path.join(run_dir, "curves.png"),
                        f"{METHODS[cfg.clr].display} {cfg.arch} on {cfg.dataset_name}, batch {cfg.batch_size}")
            tqdm.write(f"saved {trainer.last_ckpt}")
    trainer.last_ckpt = broadcast_object(trainer.last_ckpt)
