"""Self-supervised pretraining: one loop for every method.

views -> method(views, index) -> loss (negatives gathered from every rank inside the method) ->
finite check on all ranks -> backward -> optimizer step with the per-step LR -> method.after_step
(BYOL EMA, InsDis bank) -> metrics; a checkpoint every ``--save_every_n_epochs`` and at the end.
"""
from __future__ import annotations

import os
import sys
import time
from argparse import Namespace
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data import MultiViewDataset, load_split, view_specs, view_transform
from data.augment import EpochSampler, default_blur, default_jitter_strength
from data.batched_augment import BatchedViews, DeviceLoader
from engine import checkpoint as ckpt_io
from engine.distributed import (DistInfo, all_gather_object, all_reduce_sum, barrier, broadcast_object,
                                init_distributed)
from engine.errors import UserError
from engine.optim import build_optimizer, lr_schedule, scaled_lr
from engine.runlog import MetricsLog, new_run_dir, plot_curves, write_config
from models import METHODS, build_method

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(cfg: Namespace) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


MAX_RESIDENT_BYTES = 16 * 2**30  # --faster_version keeps the dataset in device memory up to this size


def resident_images(split, cfg: Namespace) -> torch.Tensor:
    """All training images as one uint8 (N, 3, H, W) tensor, for the device-resident fast path."""
    if split.in_memory:
        return split.dataset.images
    if cfg.dataset_name != "folder":
        raise UserError(f"--faster_version keeps the dataset in memory, which {cfg.dataset_name} does not fit; "
                        "drop --faster_version for this dataset")
    from PIL import Image

    n = len(split.dataset)
    with Image.open(split.dataset.samples[0][0]) as first:
        w, h = first.size
    if n * 3 * w * h > MAX_RESIDENT_BYTES:
        raise UserError(f"--faster_version: {n} images of {w}x{h} need {n * 3 * w * h / 2**30:.1f} GiB, more than "
                        f"the {MAX_RESIDENT_BYTES / 2**30:.0f} GiB limit; drop --faster_version")
    images = torch.empty(n, 3, h, w, dtype=torch.uint8)
    for i, (path, _) in enumerate(tqdm(split.dataset.samples, desc="loading images", leave=False, file=sys.stdout)):
        with Image.open(path) as img:
            if img.size != (w, h):
                raise UserError(f"--faster_version needs images of one size; {path} is {img.size[0]}x{img.size[1]}, "
                                f"not {w}x{h}; drop --faster_version")
            images[i] = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    return images


def build_loader(cfg: Namespace, dist: DistInfo, device: torch.device):
    """Returns (loader, things to set_epoch on, number of images, crop size)."""
    split = load_split(cfg.dataset_name, cfg.data, train=True, download=cfg.download, pretrain=True,
                       image_size=cfg.image_size)
    size = split.image_size
    blur = cfg.blur if cfg.blur is not None else default_blur(size)
    strength = cfg.color_jitter_strength if cfg.color_jitter_strength is not None else default_jitter_strength(size)
    specs = view_specs(cfg.clr, cfg.n_views, blur)
    n = len(split.dataset)
    if n < cfg.batch_size:
        raise UserError(f"--batch_size {cfg.batch_size} is larger than the dataset ({n} images); "
                        "lower --batch_size")
    if cfg.faster_version:
        views = [BatchedViews(size, spec, strength, cfg.min_crop_scale, split.mean, split.std) for spec in specs]
        loader = DeviceLoader(resident_images(split, cfg).to(device), views, cfg.batch_size, cfg.seed,
                              dist.rank, dist.world_size)
        return loader, [loader], n, size
    transforms = [view_transform(size, spec, strength, cfg.min_crop_scale, split.mean, split.std) for spec in specs]
    dataset = MultiViewDataset(split.dataset, transforms, seed=cfg.seed)
    # The sampler's order depends only on (seed, epoch); with W ranks the union of their step-k
    # batches is exactly the one-process step-k batch of the same global size.
    # Workers persist across epochs (no start-up wait at each epoch); the sampler hands them the epoch.
    sampler = EpochSampler(DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                              seed=cfg.seed, drop_last=True))
    loader = DataLoader(dataset, batch_size=cfg.batch_size // dist.world_size, sampler=sampler,
                        num_workers=cfg.workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=cfg.workers > 0, prefetch_factor=4 if cfg.workers > 0 else None)
    return loader, [sampler], n, size


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
            run_dir = new_run_dir(cfg.results_dir, cfg.dataset_name, cfg.batch_size, METHODS[cfg.clr])
    run_dir = broadcast_object(run_dir)
    if isinstance(run_dir, UserError):
        raise run_dir
    return run_dir


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


def pretrain(cfg: Namespace, resume: dict | None = None, resume_path: str | None = None) -> str:
    """Run (or continue) pretraining; returns the run directory."""
    device = pick_device(cfg)
    dist = init_distributed(device.type)
    if cfg.batch_size % dist.world_size:
        raise UserError(f"--batch_size {cfg.batch_size} (global) does not divide over {dist.world_size} "
                        "processes; pick a multiple of the world size")
    if cfg.precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device; use --precision bf16 or fp32 on CPU")
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)

    loader, epoch_setters, num_data, image_size = build_loader(cfg, dist, device)
    cifar_stem = cfg.cifar_stem if cfg.cifar_stem is not None else image_size <= 64
    method = build_method(cfg, num_data=num_data, cifar_stem=cifar_stem)
    sync_bn = cfg.sync_bn if cfg.sync_bn is not None else (dist.enabled and device.type == "cuda")
    if sync_bn and dist.enabled and device.type != "cuda":
        raise UserError("--sync_bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU); "
                        "drop it or pass --no-sync_bn")
    if sync_bn and dist.enabled:
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    # on unless --no-channels_last (older runs saved None)
    memory_format = torch.channels_last if cfg.channels_last is not False else torch.contiguous_format
    method = method.to(device, memory_format=memory_format)

    steps_per_epoch = len(loader) if cfg.limit_train_batches is None else min(len(loader), cfg.limit_train_batches)
    total_steps = cfg.epochs * steps_per_epoch
    peak_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.learning_rate_scaling)
    schedule = lr_schedule(peak_lr, total_steps, cfg.warmup_epochs * steps_per_epoch, cfg.scheduler)
    optimizer = build_optimizer(cfg.optimizer, method, peak_lr, cfg.weight_decay, cfg.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    start_epoch = 0
    if resume is not None:
        try:
            method.load_state_dict(resume["model"])
        except RuntimeError as err:
            raise UserError(f"{resume_path} does not match this model ({str(err).splitlines()[0]}); "
                            "resume with the run's own --model/--clr/head flags") from err
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        start_epoch = int(resume["epoch"])

    model: nn.Module = method
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    if cfg.compile:
        model = torch.compile(model)

    run_dir = prepare_run_dir(cfg, dist, resuming=resume is not None)
    writer = metrics = None
    if dist.is_main:
        write_config(run_dir, vars(cfg))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run_dir, purge_step=start_epoch * steps_per_epoch if resume else None)
        metrics = MetricsLog(run_dir, resume_epoch=start_epoch if resume else None)
        print(f"run directory: {run_dir}", flush=True)
    if resume is not None:
        states = resume.get("rng", [])
        if len(states) == dist.world_size:
            ckpt_io.set_rng_state(states[dist.rank])
        elif dist.is_main:
            print(f"warning: checkpoint has RNG states for {len(states)} process(es), this run has "
                  f"{dist.world_size}; continuing with fresh random streams", file=sys.stderr)

    monitor = None
    if cfg.eval_every_n_epochs:
        from engine.evaluate import KnnMonitor

        monitor = KnnMonitor(cfg, image_size, device)
    autocast = (torch.autocast(device.type, dtype=DTYPES[cfg.precision]) if cfg.precision in DTYPES
                else nullcontext())
    last_epoch = cfg.epochs if cfg.stop_after_epoch is None else min(cfg.epochs, cfg.stop_after_epoch)
    last_ckpt = resume_path
    global_step = start_epoch * steps_per_epoch
    if start_epoch >= last_epoch and dist.is_main:
        print(f"nothing to do: the run has completed {start_epoch} of {cfg.epochs} epochs")

    loop = _Loop(cfg, dist, device, model, method, optimizer, scaler, schedule, autocast, loader, steps_per_epoch,
                 total_steps, writer, global_step, last_ckpt, memory_format)
    for epoch in range(start_epoch, last_epoch):
        for target in epoch_setters:
            target.set_epoch(epoch)
        record = loop.train_epoch(epoch)
        completed = epoch + 1
        if monitor is not None and completed % cfg.eval_every_n_epochs == 0:
            record["knn_top1"] = monitor(method.backbone)
            if writer is not None:
                writer.add_scalar("monitor/knn_top1", record["knn_top1"], loop.global_step)
                tqdm.write(f"epoch {completed}: kNN top-1 {record['knn_top1']:.2f}% on the test split")
        rng = all_gather_object(ckpt_io.rng_state())
        if dist.is_main:
            metrics.append(record)
            if completed % cfg.save_every_n_epochs == 0 or completed in (cfg.epochs, last_epoch):
                loop.last_ckpt = os.path.join(run_dir, ckpt_io.checkpoint_name(completed))
                ckpt_io.atomic_save(loop.checkpoint(completed, peak_lr, rng), loop.last_ckpt)
                plot_curves(metrics.read(), os.path.join(run_dir, "curves.png"),
                            f"{METHODS[cfg.clr]} {cfg.arch} on {cfg.dataset_name}, batch {cfg.batch_size}")
                tqdm.write(f"saved {loop.last_ckpt}")
        loop.last_ckpt = broadcast_object(loop.last_ckpt)
    barrier()
    if writer is not None:
        writer.close()
        print(f"done: {last_epoch} of {cfg.epochs} epochs; checkpoints, metrics.jsonl, curves.png and "
              f"TensorBoard events are in {run_dir}", flush=True)
    return run_dir


@dataclass
class _Loop:
    """What one training epoch needs, and the two numbers it advances (step, last checkpoint)."""

    cfg: Namespace
    dist: DistInfo
    device: torch.device
    model: nn.Module  # the method, DDP-wrapped when distributed
    method: nn.Module  # the unwrapped method, for after_step and state_dict
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: np.ndarray
    autocast: object
    loader: DataLoader
    steps_per_epoch: int
    total_steps: int
    writer: object
    global_step: int
    last_ckpt: str | None
    memory_format: torch.memory_format = torch.contiguous_format

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the loader; returns the epoch's record for metrics.jsonl."""
        cfg, device = self.cfg, self.device
        self.model.train()
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        window: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        window_steps = 0
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not self.dist.is_main,
                   dynamic_ncols=True, leave=True, file=sys.stdout)
        t_epoch = t_window = time.perf_counter()
        for step, (views, index) in enumerate(self.loader):
            if step >= self.steps_per_epoch:
                break
            views = [v.to(device, non_blocking=True, memory_format=self.memory_format) for v in views]
            index = index.to(device, non_blocking=True)
            lr = float(self.schedule[self.global_step])
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with self.autocast:
                loss, logs = self.model(views, index)
            check = _LossCheck(loss)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            check.raise_if_any(epoch, step, self.last_ckpt)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.global_step += 1
            self.method.after_step(self.global_step, self.total_steps)

            logs = {"loss": loss.detach().float(), **{k: v.float() for k, v in logs.items()}}
            for k, v in logs.items():
                sums[k] += v
                window[k] += v
            window_steps += 1
            bar.update(1)
            if window_steps == cfg.log_every_n_steps or step == self.steps_per_epoch - 1:
                now = time.perf_counter()
                ips = window_steps * cfg.batch_size / max(now - t_window, 1e-9)
                values = {k: (v / window_steps).item() for k, v in window.items()}
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}")
                if self.writer is not None:
                    for k, v in values.items():
                        self.writer.add_scalar(f"train/{k}", v, self.global_step)
                    self.writer.add_scalar("train/lr", lr, self.global_step)
                    self.writer.add_scalar("train/images_per_s", ips, self.global_step)
                window.clear()
                window_steps, t_window = 0, now
        bar.close()
        epoch_time = time.perf_counter() - t_epoch
        return {"epoch": epoch + 1, "step": self.global_step,
                **{k: (v / self.steps_per_epoch).item() for k, v in sums.items()},
                "lr": float(self.schedule[self.global_step - 1]), "epoch_time_s": epoch_time,
                "images_per_s": self.steps_per_epoch * cfg.batch_size / epoch_time}

    def checkpoint(self, epoch: int, peak_lr: float, rng: list) -> dict:
        """Everything a resume needs, as weights_only-loadable tensors and Python values."""
        cfg = self.cfg
        return {
            "epoch": epoch, "global_step": self.global_step, "clr": cfg.clr, "arch": cfg.arch,
            "model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": {"kind": cfg.scheduler, "peak_lr": peak_lr, "total_steps": self.total_steps,
                          "warmup_steps": cfg.warmup_epochs * self.steps_per_epoch, "step": self.global_step},
            "scaler": self.scaler.state_dict(), "rng": rng, "args": vars(cfg),
        }
