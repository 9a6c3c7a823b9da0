"""Fitting a classifier for evaluation: a linear layer on cached features, or a network trained through the
(frozen or fine-tuned) backbone on augmented images, resumable from a saved position; and the class-balanced,
seeded label subsets of ``--semi_ratio``."""
from __future__ import annotations

import json
import math
import os
import sys
from argparse import Namespace
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2
from tqdm import tqdm

from common.distributed import DistInfo, all_reduce_sum, get_world_size, on_main_only, shared_outcome
from common.errors import Preempted
from data.datasets import Split, dataset_labels
from engine import checkpoint as ckpt_io
from engine.knn import Transformed, locate
from engine.optim import build_optimizer, lr_schedule


def train_transform(split: Split) -> v2.Compose:
    """SimCLR's linear-eval / fine-tuning augmentation: random resized crop and flip."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(split.image_size, antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(split.mean, split.std)])


def fit_linear_on_features(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int,
                           batch_size: int, lr: float, weight_decay: float, momentum: float, optimizer: str,
                           scheduler: str, seed: int, show: bool = True, rows: torch.Tensor | None = None) -> nn.Module:
    """Linear classifier on cached features, standardised with the training mean and std.

    Under torchrun, ``rows`` (a ``FeatureShard``'s: the positions of this rank's rows in the whole training set,
    ascending) says that each rank holds only its shard; the ranks then train one head together, which is the
    one-process head up to float rounding: the same statistics of the whole set, and every step the minibatch one
    process would take (each rank draws the same permutation of the whole set and takes the part it holds), whose
    gradient is the sum over ranks of each part's summed loss over the minibatch's size."""
    sharded = rows is not None and get_world_size() > 1
    n = int(all_reduce_sum(torch.tensor([len(train_x)], device=train_x.device))) if sharded else train_x.shape[0]
    mean, std = _whole_mean_std(train_x, n) if sharded else (train_x.mean(dim=0), train_x.std(dim=0))
    torch.manual_seed(seed)
    head = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    model = nn.Sequential(_Standardise(mean, std.clamp_min(1e-6)), head)
    opt = build_optimizer(optimizer, head, lr, weight_decay, momentum)
    bs = min(batch_size, n)
    steps = math.ceil(n / bs)
    sched = lr_schedule(lr, epochs * steps, 0, scheduler)
    gen = torch.Generator().manual_seed(seed)
    for epoch in tqdm(range(epochs), desc="linear probe", disable=not show, leave=False, file=sys.stdout):
        perm = torch.randperm(n, generator=gen).to(train_x.device)
        for s in range(steps):
            for g in opt.param_groups:
                g["lr"] = float(sched[epoch * steps + s])
            idx = perm[s * bs:(s + 1) * bs]
            opt.zero_grad(set_to_none=True)
            if sharded:
                _shard_backward(model, train_x, train_y, rows, idx)
            else:
                F.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
            opt.step()
    return model


def _whole_mean_std(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std over every rank's rows (``n`` in all) from each shard's own mean and squared
    deviations, combined exactly in float64 (Chan et al.): a sum of squares less the squared sum would lose the
    digits of a feature whose mean is large against its spread."""
    if len(x):
        var, mean = (t.double() for t in torch.var_mean(x, dim=0, correction=0))
    else:
        var = mean = x.new_zeros(x.shape[1], dtype=torch.float64)
    whole_mean = all_reduce_sum(mean * len(x)) / n
    squares = all_reduce_sum(var * len(x) + len(x) * (mean - whole_mean) ** 2)
    return whole_mean.float(), (squares / (n - 1)).sqrt().float()


def _shard_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor,
                    idx: torch.Tensor) -> None:
    """Gradients of the mean loss over the minibatch ``idx`` (positions in the whole set), on every rank: this
    rank's part summed, over the whole minibatch's size, then all-reduced (a rank holding none of it adds zero)."""
    local, _ = locate(rows, idx)
    (F.cross_entropy(model(x[local]), y[local], reduction="sum") / len(idx)).backward()
    for p in model.parameters():
        all_reduce_sum(p.grad)


class _Standardise(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# Per-device images per forward/backward when training through the backbone; --fc_batch_size (SimCLR's 4096)
# is reached by accumulation. Fine-tuning keeps the backbone's activations for the backward: ResNet-50 at
# batch 4096 was killed at 24 GB on the CPU machine. A frozen backbone keeps none, so it takes more at once.
FINETUNE_MICRO_BATCH = 256


AUGMENTED_LINEAR_MICRO_BATCH = 1024


def micro_batch(cfg: Namespace, finetune: bool) -> int:
    return cfg.fc_micro_batch_size or (FINETUNE_MICRO_BATCH if finetune else AUGMENTED_LINEAR_MICRO_BATCH)


def accumulate_gradients(net: nn.Module, x: torch.Tensor, y: torch.Tensor, micro: int) -> torch.Tensor:
    """Gradients of the batch's mean cross-entropy, from forward/backward passes of at most ``micro`` images;
    the sum of the pieces' gradients is the whole batch's (up to float rounding), except through BatchNorm,
    whose statistics are the micro-batch's: as with one more GPU each, without SyncBN. Under DDP only the last
    piece all-reduces. Returns the batch's mean loss (detached)."""
    n = -(-len(x) // micro)  # pieces as even as possible: no 1-image remainder for BatchNorm
    pieces = list(zip(x.tensor_split(n), y.tensor_split(n)))
    total = x.new_zeros(())
    for j, (xs, ys) in enumerate(pieces):
        sync = j == len(pieces) - 1 or not isinstance(net, nn.parallel.DistributedDataParallel)
        with nullcontext() if sync else net.no_sync():
            loss = F.cross_entropy(net(xs), ys, reduction="sum") / len(x)
            loss.backward()
        total += loss.detach()
    return total


class _ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start ``skip`` indices in (a resumed fit's position)."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


# What a resumed fit must share with the interrupted one (besides the checkpoint and the data).
FIT_SETTINGS = ("transfer_mode", "fc_augment", "fc_epochs", "fc_batch_size", "fc_micro_batch_size", "fc_lr",
                "fc_optimizer", "fc_weight_decay", "fc_momentum", "fc_scheduler", "semi_ratio", "seed", "arch",
                "cifar_stem", "image_size", "dataset_name", "eval_train_subset", "subset_seed")


@dataclass
class FitRun:
    """Where a fit through the backbone saves its position on a signal (None for a random-init baseline, which
    is not resumable), the requests (signals, timer) it obeys, and the saved state when it resumes."""

    path: str | None
    requests: Callable[[int], tuple[bool, bool]]
    state: dict | None = None

    def stop_message(self, received: str | None) -> str:
        return f"stopped by {received or 'a signal on another rank'}"


def fit_network(backbone: nn.Module, feat_dim: int, split: Split, train_indices: list[int] | None,
                cfg: Namespace, dist: DistInfo, device: torch.device, finetune: bool,
                fit: FitRun | None = None) -> tuple[nn.Module, dict]:
    """Linear probe through a frozen backbone (finetune=False) or full fine-tuning, with augmentation; returns
    the model and its record fields. With ``fit``, a signal (or --save_every_n_steps/minutes) saves the exact
    position to ``fit.path`` (weights, optimizer, step, the RNG streams) and a signal then raises ``Preempted``;
    ``fit.state`` continues from such a save: with --workers 0 the result is bitwise the uninterrupted one
    (with workers, the augmentations drawn after the resume differ)."""
    fit = fit or FitRun(None, lambda next_step: (False, False))
    head = nn.Sequential(nn.BatchNorm1d(feat_dim, affine=False), nn.Linear(feat_dim, split.num_classes))
    if not finetune:
        backbone.requires_grad_(False)
    model = nn.Sequential(backbone, head).to(device)
    micro = micro_batch(cfg, finetune)
    sampler, loader, local_bs = _fit_loader(split, train_indices, cfg, dist, device)
    steps = len(loader)
    trainable = model if finetune else head
    opt = build_optimizer(cfg.fc_optimizer, trainable, cfg.fc_lr, cfg.fc_weight_decay, cfg.fc_momentum)
    sched = lr_schedule(cfg.fc_lr, cfg.fc_epochs * steps, 0, cfg.fc_scheduler)
    net: nn.Module = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_sum = torch.zeros((), device=device)  # the epoch's summed loss, on the device: no host sync a step
    step, start_epoch, start_batch = _restore_fit(fit.state, model, opt, loss_sum)
    name = "finetune" if finetune else "linear"
    for epoch in range(start_epoch, cfg.fc_epochs):
        sampler.set_epoch(epoch)
        sampler.skip = start_batch * local_bs if epoch == start_epoch else 0
        first = start_batch if epoch == start_epoch else 0
        if first == 0:
            loss_sum.zero_()
        model.train()
        if not finetune:
            backbone.eval()  # frozen: BN statistics stay those of pretraining
        resuming = fit.state is not None and epoch == start_epoch
        if resuming and first == 0:  # saved at an epoch's end: before this epoch's loader drew its seed
            ckpt_io.restore_rng(fit.state, dist)
        batches = iter(loader)  # draws the loader's base seed from the global stream
        if resuming and first > 0:  # saved inside the epoch: after that draw, as it was then
            ckpt_io.restore_rng(fit.state, dist)
        bar = tqdm(batches, desc=f"{name} {epoch + 1}/{cfg.fc_epochs}", initial=first, total=steps,
                   disable=not dist.is_main, leave=False, file=sys.stdout)
        for i, (x, y, _) in enumerate(bar, start=first):
            for g in opt.param_groups:
                g["lr"] = float(sched[step])
            opt.zero_grad(set_to_none=True)
            loss = accumulate_gradients(net, x.to(device, non_blocking=True), y.to(device, non_blocking=True), micro)
            opt.step()
            step += 1
            loss_sum += loss
            stop, save = _agree(fit.requests(step), dist, device)
            if (stop or save) and step < cfg.fc_epochs * steps:
                _save_or_stop(fit, model, opt, step, (epoch, i, steps), loss_sum, stop, bar, name, cfg, dist)
        bar.close()
    model.eval()
    fields = {"fc_micro_batch_size": micro, "fc_train_loss": float(loss_sum) / max(steps, 1)}
    if fit.state is not None:
        fields["resumed_at_step"] = fit.state["step"]
    return model, fields


def _restore_fit(state: dict | None, model: nn.Module, opt: torch.optim.Optimizer,
                 loss_sum: torch.Tensor) -> tuple[int, int, int]:
    """A saved fit's weights, optimizer and running loss; returns (steps, epoch, batch) where it stopped."""
    if state is None:
        return 0, 0, 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    loss_sum += state["loss_sum"]
    return state["step"], state["fc_epoch"], state["batch"]


def _fit_loader(split: Split, train_indices: list[int] | None, cfg: Namespace, dist: DistInfo,
                device: torch.device) -> tuple["_ResumableSampler", DataLoader, int]:
    """The augmented (labelled subset of the) training images, each rank its share of ``--fc_batch_size``."""
    dataset: Dataset = Transformed(split.dataset, train_transform(split))
    if train_indices is not None:
        dataset = Subset(dataset, train_indices)
    local_bs = max(min(cfg.fc_batch_size, len(dataset)) // dist.world_size, 1)
    sampler = _ResumableSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=local_bs, sampler=sampler, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", drop_last=len(dataset) > local_bs * dist.world_size)
    return sampler, loader, local_bs


def _save_or_stop(fit: FitRun, model: nn.Module, opt: torch.optim.Optimizer, step: int, where: tuple[int, int, int],
                  loss_sum: torch.Tensor, stop: bool, bar, name: str, cfg: Namespace, dist: DistInfo) -> None:
    """A signal or a timer during a fit: save its exact position (epoch, batch ``i`` of ``steps``), and on a
    signal stop with the line that says how to continue."""
    epoch, i, steps = where
    position = (epoch, i + 1) if i + 1 < steps else (epoch + 1, 0)
    saved = _save_fit(fit, model, opt, step, position, float(loss_sum) if i + 1 < steps else 0.0, cfg, dist)
    if stop:
        bar.close()
        how = (f"after saving {saved}; continue with the same command and --train_from latest" if saved
               else "a random-init baseline is not resumable: run it again")
        raise Preempted(f"{fit.stop_message(getattr(fit.requests, 'received', None))} at {name} epoch {epoch + 1}, "
                        f"step {i + 1} of {steps}, {how}")


def _agree(wishes: tuple[bool, bool], dist: DistInfo, device: torch.device) -> tuple[bool, bool]:
    """(stop, save) when any rank wants it (one small all-reduce a step under torchrun)."""
    if not dist.enabled:
        return wishes
    from common.distributed import all_reduce_sum

    counts = all_reduce_sum(torch.tensor([float(w) for w in wishes], device=device)).tolist()
    return counts[0] > 0, counts[1] > 0


def _save_fit(fit: FitRun, model: nn.Module, opt: torch.optim.Optimizer, step: int, position: tuple[int, int],
              loss_sum: float, cfg: Namespace, dist: DistInfo) -> str | None:
    """The fit's exact position, written atomically (with its checksum) by rank 0; None without a path."""
    from common.distributed import all_gather_object

    rngs = all_gather_object(ckpt_io.rng_state())
    if fit.path is None:
        return None
    if dist.is_main:
        state = {"settings": fit_settings(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "step": step, "fc_epoch": position[0], "batch": position[1], "loss_sum": loss_sum, "rng": rngs}

        def write() -> None:
            ckpt_io.atomic_save(state, fit.path)
            tqdm.write(f"saved {fit.path}")

    shared_outcome(on_main_only(write) if dist.is_main else None)  # a failed save reaches every rank
    if hasattr(fit.requests, "saved"):
        fit.requests.saved()
    return fit.path


def fit_settings(cfg: Namespace) -> dict:
    return {k: getattr(cfg, k) for k in FIT_SETTINGS}


def semi_subset(split: Split, ratio: float, seed: int, data_root: str, dataset_name: str, save_dir: str,
                data: str | None = None) -> list[int]:
    """Class-balanced seeded subset of the training labels, saved as json and reused if present; ``data``: the
    data tag of an evaluation on other data than its run's (``records_data_tag``), whose subset is its own."""
    path = os.path.join(save_dir, f"semi_{ratio:g}_seed{seed}{'' if data is None else f'_{data}'}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["indices"]
    labels = dataset_labels(split.dataset).numpy()
    listing = os.path.join(data_root, "imagenet", f"{round(ratio * 100)}percent.txt")
    if dataset_name == "imagenet" and os.path.exists(listing):  # SimCLR's standard 1% / 10% lists
        with open(listing) as f:
            wanted = {line.strip() for line in f if line.strip()}
        chosen = [i for i, (p, _) in enumerate(split.dataset.samples) if os.path.basename(p) in wanted]
        source = listing
    else:
        rng = np.random.default_rng(seed)
        chosen = []
        for c in sorted(set(labels.tolist())):
            members = np.flatnonzero(labels == c)
            take = max(1, int(round(ratio * len(members))))
            chosen += rng.choice(members, size=take, replace=False).tolist()
        chosen.sort()
        source = f"class-balanced, seed {seed}"
    with open(path, "w") as f:
        json.dump({"ratio": ratio, "seed": seed, "source": source, "indices": chosen}, f)
    return chosen


