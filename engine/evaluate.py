"""Evaluation of pretrained backbones: ``--train_mode=eval``, one protocol per ``--transfer_mode``.

* ``knn``: weighted k-nearest neighbours on L2-normalised backbone features (engine/knn.py).
* ``linear_eval``: a linear classifier on the frozen backbone. The fast path extracts features once
  (deterministic test-time transform), standardises them and trains on the cached tensors; with
  ``--fc_augment`` it trains through the frozen backbone on freshly augmented images each epoch
  (SimCLR's protocol: random resized crop + flip, BN without affine before the linear layer).
* ``finetune``: the whole network, with augmentation (SimCLR appendix B.5).
* ``--semi_ratio``: fine-tune/probe on a class-balanced, seeded subset of the labels, saved in the
  run so every checkpoint sees the same images (ImageNet: the standard 1%/10% lists when present).

``PROTOCOLS`` maps each ``--transfer_mode`` to its function; a new protocol is one function and one entry.

Each result is a json record ``RUN/eval/<mode>[_semi<ratio>]_epoch<N>.json`` naming the data it measured (dataset,
absolute data root, image counts); an evaluation on other data than the run's own puts a data tag in the names of
the files it writes, so that one run evaluated on several data sets keeps a record of each (``records_data_tag``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
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

from common.device import pick_device
from common.provenance import provenance
from common.distributed import (DistInfo, all_reduce_sum, barrier, broadcast_object, get_world_size, init_distributed,
                                on_main_only, shared_outcome)
from common.settings import derive
from common.errors import Preempted, UserError
from common.yamlfile import read_mapping
from data import load_split
from data.datasets import Split, data_root, fixed_subset
from engine import checkpoint as ckpt_io
from engine.knn import (FeatureShard, Transformed, extract_features, extract_shard, knn_scores_sharded, locate,
                        topk_correct)
from engine.optim import build_optimizer, lr_schedule
from engine.runlog import new_run_dir, take_back
from engine.stop import StopRequests
from models.backbones import build_backbone, cifar_stem_for
from models.checkpoint_file import backbone_weights


# ----------------------------------------------------------------------------- classifiers
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


# ----------------------------------------------------------------------------- semi-supervised subsets
def semi_subset(split: Split, ratio: float, seed: int, data_root: str, dataset_name: str, save_dir: str,
                data: str | None = None) -> list[int]:
    """Class-balanced seeded subset of the training labels, saved as json and reused if present; ``data``: the
    data tag of an evaluation on other data than its run's (``records_data_tag``), whose subset is its own."""
    path = os.path.join(save_dir, f"semi_{ratio:g}_seed{seed}{'' if data is None else f'_{data}'}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["indices"]
    labels = _labels(split.dataset)
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


def _labels(dataset: Dataset) -> np.ndarray:
    if hasattr(dataset, "labels"):
        return np.asarray(dataset.labels)
    if hasattr(dataset, "targets"):
        return np.asarray(dataset.targets)
    return np.asarray([dataset[i][1] for i in range(len(dataset))])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- plots
def plot_tsne(feats: torch.Tensor, labels: torch.Tensor, class_names: list[str], path: str, title: str,
              seed: int, max_points: int = 2000) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    tsne_scatter(ax, feats, labels, class_names, seed, max_points, point_size=6)
    if len(class_names) <= 20:
        ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tsne_scatter(ax, feats: torch.Tensor, labels: torch.Tensor, class_names: list[str], seed: int, max_points: int,
                 point_size: float) -> None:
    """A t-SNE of (at most ``max_points`` of) the L2-normalised ``feats`` on the matplotlib axes ``ax``, one
    colour per class; also used by experiments/tsne_compare.py for runs side by side."""
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    keep = np.random.default_rng(seed).permutation(feats.shape[0])[:max_points]
    x = F.normalize(feats[keep].float(), dim=1).cpu().numpy()
    y = labels[keep].cpu().numpy()
    if len(x) < 3:  # no neighbourhood to keep: the points as they are, on their first two coordinates
        xy = np.pad(x, ((0, 0), (0, max(0, 2 - x.shape[1]))))[:, :2]
    else:  # perplexity must stay below the number of points (a test split of a handful of images)
        xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, max(5.0, len(x) / 10), len(x) - 1.0),
                  random_state=seed).fit_transform(x)
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for c in sorted(set(y.tolist())):
        m = y == c
        ax.scatter(xy[m, 0], xy[m, 1], s=point_size, color=cmap(c % cmap.N),
                   label=class_names[c] if c < len(class_names) else str(c))
    ax.set_xticks([])
    ax.set_yticks([])


def plot_accuracy_vs_epoch(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["checkpoint_epoch"] for r in results]
    ax.plot(epochs, [r["top1"] for r in results], marker="o", label="top-1")
    ax.plot(epochs, [r["top5"] for r in results], marker="s", label="top-5")
    ax.set_xlabel("pretraining epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point
# --checkpoint_dir values that name a baseline instead of a run: a random-init backbone, or PCA of the raw pixels
# (sthalles/SimCLR's "PCA Features" rows).
BASELINES = ("none", "pca")


def eval_defaults(cfg: Namespace) -> Namespace:
    """``cfg`` with the settings of an evaluation that depend on its protocol: the classifier's lr scales with
    its batch."""
    if cfg.fc_lr is None:
        return derive(cfg, fc_lr=(0.05 if cfg.transfer_mode == "finetune" else 0.1) * cfg.fc_batch_size / 256)
    return cfg


def select_checkpoints(cfg: Namespace) -> list[tuple[int, str | None]]:
    """[(epoch, path)] to evaluate; [(0, None)] for a baseline (random init, or PCA of the pixels)."""
    if cfg.checkpoint_dir.lower() in BASELINES:
        return [(0, None)]
    available = ckpt_io.list_checkpoints(cfg.checkpoint_dir)
    if cfg.eval_all:
        return list(available.items())
    if cfg.transfer_from_epoch is not None:
        if cfg.transfer_from_epoch not in available:
            have = ", ".join(map(str, available)) or "none"
            raise UserError(f"no checkpoint for epoch {cfg.transfer_from_epoch} in {cfg.checkpoint_dir} "
                            f"(epochs available: {have}); pass one of those to --transfer_from_epoch")
        return [(cfg.transfer_from_epoch, available[cfg.transfer_from_epoch])]
    last = max(available)
    return [(last, available[last])]


def load_backbone(path: str | None, arch: str, cifar_stem: bool, width: float = 1.0) -> tuple[nn.Module, int]:
    """The pretrained backbone of a checkpoint (or a random one of ``width`` for ``path=None``); the stem is
    read from the weights, the width from the checkpoint's record (1.0 before there was one)."""
    if path is None:
        return build_backbone(arch, cifar_stem, width)
    state = ckpt_io.load_checkpoint(path)
    weights = backbone_weights(state["model"])
    if not weights:
        raise UserError(f"{path} holds no backbone weights; it was not written by this tool's pretraining")
    trained_arch = state.get("arch", arch)
    if trained_arch != arch:
        raise UserError(f"{path} holds a {trained_arch} backbone, not {arch}; drop --arch (or pass "
                        f"--arch {trained_arch})")
    stem = weights["conv1.weight"].shape[-1] == 3
    backbone, dim = build_backbone(arch, stem, state.get("width_multiplier", 1.0))
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"{path} does not fit a {arch} backbone ({str(err).splitlines()[0]}); "
                        "pass the --arch it was pretrained with") from err
    return backbone, dim


@dataclass
class EvalJob:
    """What every protocol gets: the settings, the splits, and the labelled training subset (None: all)."""

    cfg: Namespace
    dist: DistInfo
    device: torch.device
    train: Split
    test: Split
    train_indices: list[int] | None
    out_dir: str = ""
    random_init: bool = False
    requests: Callable[[int], tuple[bool, bool]] = lambda next_step: (False, False)
    resume: dict | None = None  # the saved position of an interrupted fit (--train_from latest)
    epoch: int = 0  # the checkpoint being evaluated

    def fit_run(self) -> FitRun:
        """Where the fit of this checkpoint saves its position, and the position it resumes from."""
        path = None if self.random_init else partial_path(self.out_dir, self.cfg, self.epoch)
        return FitRun(path, self.requests, self.resume)

    @property
    def batch(self) -> int:  # feature extraction batch
        return min(self.cfg.fc_batch_size, 512)

    def train_shard(self, backbone: nn.Module) -> FeatureShard:
        """This rank's rows of the training features (all of them in one process), of the label subset if any."""
        shard = extract_shard(backbone, self.train, self.device, self.batch, self.cfg.workers, "train features",
                              self.dist.is_main)
        return shard if self.train_indices is None else shard.select(self.train_indices)

    def train_features(self, backbone: nn.Module, desc: str = "train features") -> tuple[torch.Tensor, torch.Tensor]:
        """The whole training features on every rank, for a protocol that cannot take shards."""
        x, y = extract_features(backbone, self.train, self.device, self.batch, self.cfg.workers, desc,
                                self.dist.is_main)
        if self.train_indices is None:
            return x, y
        sel = torch.tensor(self.train_indices, device=x.device)
        return x[sel], y[sel]

    def fc_settings(self) -> dict:
        cfg = self.cfg
        return dict(fc_epochs=cfg.fc_epochs, fc_lr=cfg.fc_lr, fc_batch_size=cfg.fc_batch_size,
                    fc_optimizer=cfg.fc_optimizer, fc_weight_decay=cfg.fc_weight_decay)


# A protocol: (job, backbone, feature dim, test features) -> (test scores, record fields, test features to plot).
Protocol = Callable[[EvalJob, nn.Module, int, torch.Tensor], tuple[torch.Tensor, dict, torch.Tensor]]


def knn_protocol(job: EvalJob, backbone: nn.Module, dim: int, test_x: torch.Tensor):
    shard = job.train_shard(backbone)  # test_x: the whole test set on every rank, the train set sharded
    scores = knn_scores_sharded(shard.feats, shard.labels, test_x, job.train.num_classes, job.cfg.knn_k,
                                job.cfg.knn_temperature)
    return scores, dict(k=job.cfg.knn_k, temperature=job.cfg.knn_temperature), test_x


def linear_protocol(job: EvalJob, backbone: nn.Module, dim: int, test_x: torch.Tensor):
    cfg = job.cfg
    if cfg.fc_augment:
        return _train_through(job, backbone, dim, test_x, finetune=False)
    shard = job.train_shard(backbone)
    head = fit_linear_on_features(shard.feats, shard.labels, job.train.num_classes, cfg.fc_epochs, cfg.fc_batch_size,
                                  cfg.fc_lr, cfg.fc_weight_decay, cfg.fc_momentum, cfg.fc_optimizer,
                                  cfg.fc_scheduler, cfg.seed, job.dist.is_main, rows=shard.rows)
    with torch.no_grad():
        scores = head(test_x)
    return scores, dict(path="cached features", **job.fc_settings()), test_x


def finetune_protocol(job: EvalJob, backbone: nn.Module, dim: int, test_x: torch.Tensor):
    return _train_through(job, backbone, dim, test_x, finetune=True)


def _train_through(job: EvalJob, backbone: nn.Module, dim: int, test_x: torch.Tensor, finetune: bool):
    """Train on augmented images through the backbone (frozen or not); fine-tuning plots its own features."""
    model, fit_fields = fit_network(backbone, dim, job.train, job.train_indices, job.cfg, job.dist, job.device,
                                    finetune, job.fit_run())
    scores, _ = extract_features(model, job.test, job.device, job.batch, job.cfg.workers, "test logits",
                                 job.dist.is_main)
    if finetune:
        test_x, _ = extract_features(model[0], job.test, job.device, job.batch, job.cfg.workers, show=False)
    return scores, dict(path="augmented", **fit_fields, **job.fc_settings()), test_x


def logistic_protocol(job: EvalJob, backbone: nn.Module, dim: int, test_x: torch.Tensor):
    """sthalles/SimCLR's "Logistic Regression (LBFGS)" rows: scikit-learn's L-BFGS logistic regression (C = 1,
    up to --logistic_max_iter iterations) on frozen features standardised with the training set's mean and std."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_x, train_y = job.train_features(backbone)  # scikit-learn fits in one process: the whole set on every rank
    scaler = StandardScaler().fit(train_x.double().cpu().numpy())
    clf = LogisticRegression(solver="lbfgs", C=1.0, max_iter=job.cfg.logistic_max_iter, random_state=job.cfg.seed)
    clf.fit(scaler.transform(train_x.double().cpu().numpy()), train_y.cpu().numpy())
    log_p = torch.from_numpy(clf.predict_log_proba(scaler.transform(test_x.double().cpu().numpy())))
    scores = torch.full((test_x.shape[0], job.train.num_classes), float("-inf"), dtype=torch.float64)
    scores[:, torch.from_numpy(clf.classes_).long()] = log_p  # classes missing from a label subset never win
    return scores.to(test_x.device), dict(C=1.0, max_iter=job.cfg.logistic_max_iter, n_iter=int(clf.n_iter_.max())), \
        test_x


class PCAFeatures(nn.Module):
    """Raw (normalised) pixels projected on their first principal components: the no-learning baseline."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("components", components)  # (D, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) - self.mean) @ self.components


def fit_pca(job: EvalJob, k: int) -> tuple[nn.Module, int]:
    """PCA of the training images' pixels (as the evaluation transform gives them) to ``k`` dimensions."""
    pixels, _ = job.train_features(nn.Flatten(), "pixels")
    k = min(k, pixels.shape[0], pixels.shape[1])
    mean = pixels.mean(dim=0)
    _, _, v = torch.pca_lowrank(pixels - mean, q=k, center=False, niter=4)
    return PCAFeatures(mean, v[:, :k]).to(job.device), k


PROTOCOLS: dict[str, Protocol] = {"linear_eval": linear_protocol, "finetune": finetune_protocol, "knn": knn_protocol,
                                  "logistic": logistic_protocol}


def evaluate(cfg: Namespace) -> list[dict]:
    """Run the evaluation ``cfg`` describes; returns the result records (also written as json). An evaluation
    that fails takes back the files it wrote."""
    device = pick_device(cfg.device)
    dist = init_distributed(device.type)
    chosen = select_checkpoints(cfg)
    skip = bool(cfg.skip_bad_images)
    train = load_split(cfg.dataset_name, cfg.data, train=True, download=cfg.download, image_size=cfg.image_size,
                       skip_bad_images=skip)
    test = load_split(cfg.dataset_name, cfg.data, train=False, download=cfg.download, image_size=train.image_size,
                      skip_bad_images=skip)
    if cfg.eval_train_subset is not None:
        train = fixed_subset(train, cfg.eval_train_subset, cfg.subset_seed, "eval_train_subset")
    random_init = chosen[0][1] is None
    if cfg.fc_iters:  # classifier steps (MetaContrastive's eval --iters), in whole epochs
        n = len(train.dataset) if cfg.semi_ratio is None else max(1, round(cfg.semi_ratio * len(train.dataset)))
        bs = min(cfg.fc_batch_size, n)
        steps = max(1, n // bs) if trains_through(cfg) else math.ceil(n / bs)  # the fit's loader drops a remainder
        cfg = derive(cfg, fc_epochs=max(1, math.ceil(cfg.fc_iters / steps)))
    resume = interrupted_fit(cfg, chosen) if cfg.train_from is not None else None
    planned = None if random_init else os.path.join(cfg.checkpoint_dir, "eval")
    created = random_init or not os.path.isdir(planned)
    out_dir = _output_dir(cfg, dist, random_init)
    board = os.path.join(out_dir, "tensorboard")
    before = set(os.listdir(board)) if os.path.isdir(board) else set()
    try:
        with StopRequests(cfg) as requests:
            return _evaluate(cfg, dist, device, chosen, train, test, out_dir, requests, resume)
    except BaseException:
        if dist.is_main:  # results already written for earlier checkpoints stay; this run's events file goes
            take_back(board, before, created=not before)
            if created and not os.listdir(out_dir):
                take_back(out_dir if not random_init else os.path.dirname(out_dir), None, True, cfg.results_dir,
                          only_if_empty=not random_init)
        raise


def interrupted_fit(cfg: Namespace, chosen: list[tuple[int, str | None]]) -> dict:
    """The saved position that ``--train_from`` in eval mode continues (checked before anything is written)."""
    if cfg.train_from != "latest":
        raise UserError(f"--train_from {cfg.train_from}: in eval mode only 'latest' is understood (it continues "
                        "the interrupted evaluation of the same command)")
    if chosen[0][1] is None:
        raise UserError("--train_from latest: a random-init baseline is not resumable; drop --train_from")
    if not trains_through(cfg):
        raise UserError(f"--train_from latest: --transfer_mode {cfg.transfer_mode} saves no position (only finetune "
                        "and --fc_augment linear_eval do); drop --train_from")
    if len(chosen) > 1:
        raise UserError("--train_from latest continues one checkpoint's evaluation: pass --transfer_from_epoch "
                        "instead of --eval_all")
    path = partial_path(os.path.join(cfg.checkpoint_dir, "eval"), cfg, chosen[0][0])
    if not os.path.exists(path):
        raise UserError(f"--train_from latest: there is no interrupted evaluation to continue ({path} does not "
                        "exist); drop --train_from to start it")
    state = ckpt_io.read_file(path)
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict) or "model" not in state:
        raise UserError(f"{path} is not an interrupted evaluation of this tool; delete it to start afresh")
    for key, value in state["settings"].items():
        if getattr(cfg, key, None) != value:
            raise UserError(f"{path} was saved with --{key}={value}, not {getattr(cfg, key, None)}; continue with "
                            f"the same settings, or delete that file to start afresh")
    return state


def trains_through(cfg: Namespace) -> bool:
    """Whether the evaluation trains through the backbone (and so saves a position on a signal)."""
    return cfg.transfer_mode == "finetune" or (cfg.transfer_mode == "linear_eval" and bool(cfg.fc_augment))


def partial_path(out_dir: str, cfg: Namespace, epoch: int) -> str:
    """Where a fit of checkpoint ``epoch`` saves its position (removed once its result is written)."""
    return record_path(out_dir, cfg.transfer_mode, cfg.semi_ratio, epoch, PARTIAL, data=records_data_tag(cfg))


def _evaluate(cfg: Namespace, dist: DistInfo, device: torch.device, chosen: list, train: Split, test: Split,
              out_dir: str, requests: StopRequests, resume: dict | None) -> list[dict]:
    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
    train_indices = None
    if cfg.semi_ratio is not None:
        train_indices = broadcast_object(semi_subset(train, cfg.semi_ratio, cfg.seed, cfg.data, cfg.dataset_name,
                                                     out_dir, records_data_tag(cfg)) if dist.is_main else None)
    job = EvalJob(cfg, dist, device, train, test, train_indices, out_dir, chosen[0][1] is None, requests, resume)
    cifar_stem = cifar_stem_for(cfg.cifar_stem, train.image_size)
    results = []
    pca = cfg.checkpoint_dir.lower() == "pca"
    for epoch, path in chosen:
        job.epoch = epoch
        torch.manual_seed(cfg.seed)  # first: the random-init baseline's weights come from this seed
        if pca:
            backbone, dim = fit_pca(job, cfg.pca_dim)
        else:
            backbone, dim = load_backbone(path, cfg.arch, cifar_stem, cfg.width_multiplier)
        backbone = backbone.to(device)
        test_x, test_y = extract_features(backbone, test, device, job.batch, cfg.workers, "test features",
                                          dist.is_main)
        scores, fields, test_x = PROTOCOLS[cfg.transfer_mode](job, backbone, dim, test_x)
        top1, top5 = topk_correct(scores, test_y)
        record = {"mode": cfg.transfer_mode, **measured_data(cfg), "data_train_images": len(train.dataset),
                  "data_test_images": len(test.dataset), "checkpoint_epoch": epoch,
                  "checkpoint": path or ("pca" if pca else "random-init"), "arch": f"pca-{dim}" if pca else cfg.arch,
                  "semi_ratio": cfg.semi_ratio,
                  "train_images": len(train_indices) if train_indices is not None else len(train.dataset),
                  "test_images": len(test.dataset), **fields,
                  "top1": 100.0 * top1 / len(test_y), "top5": 100.0 * top5 / len(test_y),
                  "provenance": provenance(device, dist.world_size)}
        results.append(record)
        if dist.is_main:
            _report(cfg, record, out_dir, writer)
            if trains_through(cfg) and os.path.exists(partial_path(out_dir, cfg, epoch)):  # spent once written
                ckpt_io.remove_checkpoint(partial_path(out_dir, cfg, epoch))
    if dist.is_main:
        _finish(cfg, results, out_dir, writer, test, test_x, test_y, chosen[-1][0])
    return results


def _output_dir(cfg: Namespace, dist: DistInfo, random_init: bool) -> str:
    """``RUN/eval``; a random-init baseline gets a fresh run directory of its own."""
    if not random_init:
        out_dir = os.path.join(cfg.checkpoint_dir, "eval")
    else:
        out_dir = None
        if dist.is_main:
            name = f"pca-{cfg.pca_dim}" if cfg.checkpoint_dir.lower() == "pca" else f"random-init-{cfg.arch}"
            out_dir = os.path.join(new_run_dir(cfg.results_dir, cfg.dataset_name, 0, name), "eval")
        out_dir = broadcast_object(out_dir)
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
    barrier()
    return out_dir


def record_tag(transfer_mode: str, semi_ratio: float | None, data: str | None = None) -> str:
    """The name of an evaluation's records: ``<mode>[_semi<ratio>][_<data tag>]`` (its json is
    ``<tag>_epoch<N>.json``); the data tag only for an evaluation on other data than its run's."""
    return f"{transfer_mode}{'' if semi_ratio is None else f'_semi{semi_ratio:g}'}{'' if data is None else f'_{data}'}"


def record_path(out_dir: str, transfer_mode: str, semi_ratio: float | None, epoch: int,
                suffix: str = ".json", data: str | None = None) -> str:
    """``<out_dir>/<tag>_epoch<N><suffix>``: an evaluation's json record, or with ``PARTIAL`` the saved
    position of its fit (what --final_eval and the sweeps look for too: the run's own data, ``data`` None)."""
    return os.path.join(out_dir, f"{record_tag(transfer_mode, semi_ratio, data)}_epoch{epoch:04d}{suffix}")


PARTIAL = ".partial.pth.tar"


def measured_data(cfg: Namespace) -> dict:
    """What an evaluation measures, as its record says it: the dataset and the absolute data root (None for a
    dataset that reads no file, such as digits)."""
    return {"dataset": cfg.dataset_name, "data_root": data_root(cfg.dataset_name, cfg.data)}


def same_data(a: dict, b: dict) -> bool:
    """Whether two records (or a run's settings as ``measured_data``) measured the same data: the same dataset
    and data root, compared as real paths. A record from before data roots were recorded: its dataset alone."""
    if a.get("dataset") != b.get("dataset"):
        return False
    if "data_root" not in a or "data_root" not in b:
        return True
    roots = a["data_root"], b["data_root"]
    if not all(isinstance(r, str) for r in roots):  # None: a dataset that reads no file
        return roots[0] == roots[1]
    return os.path.realpath(roots[0]) == os.path.realpath(roots[1])


def data_tag(dataset: str, root: str | None) -> str:
    """``<dataset>[-<folder name>-<6 hex digits of the root's real path>]``: names the data of an evaluation in
    the names of its files, when that is not its run's own data."""
    if root is None:
        return dataset
    real = os.path.realpath(root)
    folder = re.sub(r"[^A-Za-z0-9.-]+", "-", os.path.basename(real.rstrip(os.sep)) or "root")[:24]
    return f"{dataset}-{folder}-{hashlib.sha1(real.encode()).hexdigest()[:6]}"


def _run_data(run_dir: str) -> dict | None:
    """The data a run was pretrained on (its config.yaml's dataset_name and data), None when unknown."""
    try:
        saved = read_mapping(os.path.join(run_dir, "config.yaml"), "config.yaml")
    except UserError:
        return None
    if not all(isinstance(saved.get(k), str) for k in ("dataset_name", "data")):
        return None
    return measured_data(Namespace(dataset_name=saved["dataset_name"], data=saved["data"]))


def records_data_tag(cfg: Namespace) -> str | None:
    """The data tag in the names of the files an evaluation writes (records, t-SNE, accuracy plot, label subset,
    a fit's saved position): None -- the plain names that --final_eval, the sweeps and summaries read -- when it
    measures its run's own data (the dataset and data root in the run's config.yaml, which an evaluation inherits
    without --dataset_name/--data), and for a baseline or a run without config.yaml; else ``data_tag`` of its
    data, so that evaluating a run on other data (transfer) keeps its own-data records and vice versa."""
    if cfg.checkpoint_dir.lower() in BASELINES:
        return None
    run, mine = _run_data(cfg.checkpoint_dir), measured_data(cfg)
    return None if run is None or same_data(run, mine) else data_tag(mine["dataset"], mine["data_root"])


def record_file(cfg: Namespace, record: dict, out_dir: str) -> str:
    """Where ``record`` is written: ``record_path`` with ``records_data_tag``. A record already there that
    measured other data (a record of an older version, or of a run whose config.yaml is missing) is never
    overwritten: the new one goes under its own data's tag. A record of the same data is replaced, as a rerun
    should."""
    epoch = record["checkpoint_epoch"]
    path = record_path(out_dir, cfg.transfer_mode, cfg.semi_ratio, epoch, data=records_data_tag(cfg))
    try:
        with open(path, encoding="utf-8") as f:
            there = json.load(f)
    except (OSError, ValueError):  # none there (or not a record): written as before
        return path
    if isinstance(there, dict) and not same_data(there, record):
        path = record_path(out_dir, cfg.transfer_mode, cfg.semi_ratio, epoch,
                           data=data_tag(record["dataset"], record["data_root"]))
    return path


def _mode_tag(cfg: Namespace) -> str:
    """``<mode>[_<data tag>]``: the name of an evaluation's t-SNE and accuracy-against-epoch files."""
    return record_tag(cfg.transfer_mode, None, records_data_tag(cfg))


def _report(cfg: Namespace, record: dict, out_dir: str, writer) -> None:
    epoch = record["checkpoint_epoch"]
    path = record_file(cfg, record, out_dir)
    tag = os.path.basename(path)[:-len(f"_epoch{epoch:04d}.json")]
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    writer.add_scalar(f"eval/{tag}_top1", record["top1"], epoch)
    writer.add_scalar(f"eval/{tag}_top5", record["top5"], epoch)
    print(f"{tag} epoch {epoch}: top-1 {record['top1']:.2f}%  top-5 {record['top5']:.2f}%  "
          f"({record['test_images']} test images)", flush=True)


def _finish(cfg: Namespace, results: list[dict], out_dir: str, writer, test: Split, test_x: torch.Tensor,
            test_y: torch.Tensor, epoch: int) -> None:
    """t-SNE of the last checkpoint's test features, the accuracy-against-epoch plot, closing lines."""
    if cfg.tsne:
        names = _class_names(test)
        layer = cfg.tsne_layer
        if layer == "projection":  # the seed-001 kind: the FC/projection output of the last checkpoint
            from models.pretrained import load_projector

            path = results[-1]["checkpoint"]
            if not os.path.isfile(path):
                raise UserError(f"--tsne_layer projection needs a run's checkpoint, not {path}; use --tsne_layer "
                                "backbone")
            with torch.no_grad():
                test_x = load_projector(path, test_x.device)(test_x)
        png = os.path.join(out_dir, f"tsne_{_mode_tag(cfg)}"
                                    f"{'_projection' * (layer == 'projection')}_epoch{epoch:04d}.png")
        plot_tsne(test_x, test_y, names, png, f"t-SNE of test {layer} features ({cfg.transfer_mode}), "
                  f"checkpoint epoch {epoch}", cfg.seed)
        writer.add_embedding(test_x[:2000].cpu(), metadata=[names[int(c)] for c in test_y[:2000]],
                             tag=f"test_features_epoch{epoch:04d}")
        print(f"t-SNE: {png}")
    if cfg.eval_all:
        summary = os.path.join(out_dir, f"{_mode_tag(cfg)}_all_epochs")
        with open(summary + ".json", "w") as f:
            json.dump(results, f, indent=1)
        plot_accuracy_vs_epoch(results, summary + ".png",
                               f"{cfg.transfer_mode} on {cfg.dataset_name} against pretraining epoch")
        print(f"accuracy against epoch: {summary}.png")
    writer.close()
    print(f"results in {out_dir}")


def _class_names(split: Split) -> list[str]:
    ds = split.dataset
    names = getattr(ds, "classes", None)
    return list(names) if names else [str(c) for c in range(split.num_classes)]
