"""Evaluation of pretrained backbones: ``--train_mode=eval``.

* ``knn``: weighted k-nearest neighbours on L2-normalised backbone features (Wu et al. 2018, as InsDis
  and lightly report it): the k most similar training images vote with weight exp(sim / T).
* ``linear_eval``: a linear classifier on the frozen backbone. The fast path extracts features once
  (deterministic test-time transform), standardises them and trains on the cached tensors; with
  ``--fc_augment`` it trains through the frozen backbone on freshly augmented images each epoch
  (SimCLR's protocol: random resized crop + flip, BN without affine before the linear layer).
* ``finetune``: the whole network, with augmentation (SimCLR appendix B.5).
* ``--semi_ratio``: fine-tune/probe on a class-balanced, seeded subset of the labels, saved in the
  run so every checkpoint sees the same images (ImageNet: the standard 1%/10% lists when present).
"""
from __future__ import annotations

import json
import math
import os
import sys
from argparse import Namespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from data import load_split
from data.datasets import Split
from engine import checkpoint as ckpt_io
from engine.distributed import (DistInfo, barrier, broadcast_object, gather_no_grad, get_rank, get_world_size,
                                init_distributed)
from engine.errors import UserError
from engine.optim import build_optimizer, lr_schedule
from engine.runlog import new_run_dir
from models.backbones import build_backbone


# ----------------------------------------------------------------------------- metrics and references
def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the k highest scores, for each k."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # (N, k_max)
    hit = top == labels[:, None]
    return [int(hit[:, : min(k, k_max)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
               num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores (N_test, C) of weighted kNN on cosine similarity."""
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)  # (B, k)
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        out.append(votes)
    return torch.cat(out)


# ----------------------------------------------------------------------------- features
class _Transformed(Dataset):
    def __init__(self, base: Dataset, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        image, label = self.base[i]
        if isinstance(image, torch.Tensor):
            image = tv_tensors.Image(image)
        return self.transform(image), label, i


def test_transform(split: Split) -> v2.Compose:
    """Centre view: images at the training size pass through; larger ones resize to 8/7 and crop."""
    ops: list = [v2.ToImage()]
    if not split.in_memory or split.image_size > 64:
        ops += [v2.Resize(int(round(split.image_size * 8 / 7)), antialias=True), v2.CenterCrop(split.image_size)]
    elif split.dataset[0][0].shape[-1] != split.image_size:
        ops += [v2.Resize(split.image_size, antialias=True)]
    return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(split.mean, split.std)])


def train_transform(split: Split) -> v2.Compose:
    """SimCLR's linear-eval / fine-tuning augmentation: random resized crop and flip."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(split.image_size, antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(split.mean, split.std)])


@torch.no_grad()
def extract_features(backbone: nn.Module, split: Split, device: torch.device, batch_size: int, workers: int,
                     desc: str = "features", show: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels of a whole split, in dataset order. Each rank embeds every
    W-th image and the shards are gathered, so all ranks return the full tensors."""
    rank, world = get_rank(), get_world_size()
    n = len(split.dataset)
    mine = list(range(rank, n, world))
    per_rank = math.ceil(n / world)
    loader = DataLoader(Subset(_Transformed(split.dataset, test_transform(split)), mine), batch_size=batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda")
    was_training = backbone.training
    backbone.eval()
    feats, labels, index = [], [], []
    for x, y, i in tqdm(loader, desc=desc, disable=not (show and rank == 0), leave=False, file=sys.stdout):
        feats.append(backbone(x.to(device, non_blocking=True)).float())
        labels.append(y.to(device))
        index.append(i.to(device))
    backbone.train(was_training)
    f, y, i = torch.cat(feats), torch.cat(labels), torch.cat(index)
    if world > 1:  # pad every shard to the same length, gather, drop the padding, restore the order
        pad = per_rank - f.shape[0]
        f = torch.cat([f, f.new_zeros(pad, f.shape[1])])
        y = torch.cat([y, y.new_full((pad,), -1)])
        i = torch.cat([i, i.new_full((pad,), -1)])
        f, y, i = gather_no_grad(f), gather_no_grad(y), gather_no_grad(i)
        keep = i >= 0
        f, y, i = f[keep], y[keep], i[keep]
    order = torch.argsort(i)
    return f[order], y[order]


class KnnMonitor:
    """kNN top-1 on the test split during pretraining (``--eval_every_n_epochs``), labelled train split
    as the memory: the number that tells a user early whether a run is learning."""

    def __init__(self, cfg: Namespace, image_size: int, device: torch.device) -> None:
        self.train = load_split(cfg.dataset_name, cfg.data, train=True, download=cfg.download, image_size=image_size)
        self.test = load_split(cfg.dataset_name, cfg.data, train=False, download=cfg.download, image_size=image_size)
        self.device, self.workers, self.k, self.t = device, cfg.workers, cfg.knn_k, cfg.knn_temperature

    def __call__(self, backbone: nn.Module) -> float:
        train_x, train_y = extract_features(backbone, self.train, self.device, 512, self.workers, show=False)
        test_x, test_y = extract_features(backbone, self.test, self.device, 512, self.workers, show=False)
        scores = knn_scores(train_x, train_y, test_x, self.train.num_classes, self.k, self.t)
        return 100.0 * topk_correct(scores, test_y, ks=(1,))[0] / len(test_y)


# ----------------------------------------------------------------------------- classifiers
def fit_linear_on_features(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int,
                           batch_size: int, lr: float, weight_decay: float, momentum: float, optimizer: str,
                           scheduler: str, seed: int, show: bool = True) -> nn.Module:
    """Linear classifier on cached features, standardised with the training mean and std."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0).clamp_min(1e-6)
    torch.manual_seed(seed)
    head = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    model = nn.Sequential(_Standardise(mean, std), head)
    opt = build_optimizer(optimizer, head, lr, weight_decay, momentum)
    bs = min(batch_size, train_x.shape[0])
    steps = math.ceil(train_x.shape[0] / bs)
    sched = lr_schedule(lr, epochs * steps, 0, scheduler)
    gen = torch.Generator().manual_seed(seed)
    for epoch in tqdm(range(epochs), desc="linear probe", disable=not show, leave=False, file=sys.stdout):
        perm = torch.randperm(train_x.shape[0], generator=gen).to(train_x.device)
        for s in range(steps):
            for g in opt.param_groups:
                g["lr"] = float(sched[epoch * steps + s])
            idx = perm[s * bs:(s + 1) * bs]
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


class _Standardise(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def fit_network(backbone: nn.Module, feat_dim: int, split: Split, train_indices: list[int] | None,
                cfg: Namespace, dist: DistInfo, device: torch.device, finetune: bool) -> nn.Module:
    """Linear probe through a frozen backbone (finetune=False) or full fine-tuning, with augmentation."""
    head = nn.Sequential(nn.BatchNorm1d(feat_dim, affine=False), nn.Linear(feat_dim, split.num_classes))
    if not finetune:
        backbone.requires_grad_(False)
    model = nn.Sequential(backbone, head).to(device)
    dataset: Dataset = _Transformed(split.dataset, train_transform(split))
    if train_indices is not None:
        dataset = Subset(dataset, train_indices)
    bs = min(cfg.fc_batch_size, len(dataset))
    local_bs = max(bs // dist.world_size, 1)
    sampler = DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=local_bs, sampler=sampler, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", drop_last=len(dataset) > local_bs * dist.world_size)
    trainable = model if finetune else head
    opt = build_optimizer(cfg.fc_optimizer, trainable, cfg.fc_lr, cfg.fc_weight_decay, cfg.fc_momentum)
    sched = lr_schedule(cfg.fc_lr, cfg.fc_epochs * len(loader), 0, cfg.fc_scheduler)
    net: nn.Module = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step = 0
    for epoch in range(cfg.fc_epochs):
        sampler.set_epoch(epoch)
        model.train()
        if not finetune:
            backbone.eval()  # frozen: BN statistics stay those of pretraining
        bar = tqdm(loader, desc=f"{'finetune' if finetune else 'linear'} {epoch + 1}/{cfg.fc_epochs}",
                   disable=not dist.is_main, leave=False, file=sys.stdout)
        for x, y, _ in bar:
            for g in opt.param_groups:
                g["lr"] = float(sched[step])
            loss = F.cross_entropy(net(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    return model


# ----------------------------------------------------------------------------- semi-supervised subsets
def semi_subset(split: Split, ratio: float, seed: int, data_root: str, dataset_name: str, save_dir: str) -> list[int]:
    """Class-balanced seeded subset of the training labels, saved as json and reused if present."""
    path = os.path.join(save_dir, f"semi_{ratio:g}_seed{seed}.json")
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
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    keep = rng.permutation(feats.shape[0])[:max_points]
    x = F.normalize(feats[keep].float(), dim=1).cpu().numpy()
    y = labels[keep].cpu().numpy()
    xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, max(5.0, len(x) / 10)),
              random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for c in sorted(set(y.tolist())):
        m = y == c
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(c % cmap.N),
                   label=class_names[c] if c < len(class_names) else str(c))
    if len(class_names) <= 20:
        ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
def select_checkpoints(cfg: Namespace) -> list[tuple[int, str | None]]:
    """[(epoch, path)] to evaluate; [(0, None)] for the random-init baseline."""
    if cfg.checkpoint_dir.lower() == "none":
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


def load_backbone(path: str | None, arch: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    """The pretrained backbone of a checkpoint (or a random one for ``path=None``)."""
    if path is None:
        return build_backbone(arch, cifar_stem)
    state = ckpt_io.load_checkpoint(path)
    weights = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    if not weights:
        raise UserError(f"{path} holds no backbone weights; it was not written by this tool's pretraining")
    trained_arch = state.get("arch", arch)
    if trained_arch != arch:
        raise UserError(f"{path} holds a {trained_arch} backbone, not {arch}; drop --model (or pass "
                        f"--model {trained_arch})")
    stem = weights["conv1.weight"].shape[-1] == 3
    backbone, dim = build_backbone(arch, stem)
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"{path} does not fit a {arch} backbone ({str(err).splitlines()[0]}); "
                        "pass the --model it was pretrained with") from err
    return backbone, dim


def evaluate(cfg: Namespace) -> list[dict]:
    """Run the evaluation ``cfg`` describes; returns the result records (also written as json)."""
    from engine.pretrain import pick_device

    device = pick_device(cfg)
    dist = init_distributed(device.type)
    chosen = select_checkpoints(cfg)
    train = load_split(cfg.dataset_name, cfg.data, train=True, download=cfg.download, image_size=cfg.image_size)
    test = load_split(cfg.dataset_name, cfg.data, train=False, download=cfg.download, image_size=train.image_size)
    if chosen[0][1] is None:
        out_dir = None
        if dist.is_main:
            out_dir = os.path.join(new_run_dir(cfg.results_dir, cfg.dataset_name, 0, f"random-init-{cfg.arch}"),
                                   "eval")
        out_dir = broadcast_object(out_dir)
    else:
        out_dir = os.path.join(cfg.checkpoint_dir, "eval")
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
    barrier()
    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
    train_indices = None
    if cfg.semi_ratio is not None:
        train_indices = broadcast_object(semi_subset(train, cfg.semi_ratio, cfg.seed, cfg.data, cfg.dataset_name,
                                                     out_dir) if dist.is_main else None)
    cifar_stem = cfg.cifar_stem if cfg.cifar_stem is not None else train.image_size <= 64
    results = []
    for epoch, path in chosen:
        torch.manual_seed(cfg.seed)  # first: the random-init baseline's weights come from this seed
        backbone, dim = load_backbone(path, cfg.arch, cifar_stem)
        backbone = backbone.to(device)
        record = {"mode": cfg.transfer_mode, "dataset": cfg.dataset_name, "checkpoint_epoch": epoch,
                  "checkpoint": path or "random-init", "arch": cfg.arch, "semi_ratio": cfg.semi_ratio,
                  "train_images": len(train_indices) if train_indices is not None else len(train.dataset),
                  "test_images": len(test.dataset)}
        bs = cfg.fc_batch_size
        test_x, test_y = extract_features(backbone, test, device, min(bs, 512), cfg.workers, "test features",
                                          dist.is_main)
        if cfg.transfer_mode == "knn" or (cfg.transfer_mode == "linear_eval" and not cfg.fc_augment):
            train_x, train_y = extract_features(backbone, train, device, min(bs, 512), cfg.workers,
                                                "train features", dist.is_main)
            if train_indices is not None:
                sel = torch.tensor(train_indices, device=train_x.device)
                train_x, train_y = train_x[sel], train_y[sel]
            if cfg.transfer_mode == "knn":
                scores = knn_scores(train_x, train_y, test_x, train.num_classes, cfg.knn_k, cfg.knn_temperature)
                record.update(k=cfg.knn_k, temperature=cfg.knn_temperature)
            else:
                head = fit_linear_on_features(train_x, train_y, train.num_classes, cfg.fc_epochs, bs, cfg.fc_lr,
                                              cfg.fc_weight_decay, cfg.fc_momentum, cfg.fc_optimizer,
                                              cfg.fc_scheduler, cfg.seed, dist.is_main)
                with torch.no_grad():
                    scores = head(test_x)
                record.update(path="cached features")
        else:
            model = fit_network(backbone, dim, train, train_indices, cfg, dist, device,
                                finetune=cfg.transfer_mode == "finetune")
            scores, _ = extract_features(model, test, device, min(bs, 512), cfg.workers, "test logits",
                                         dist.is_main)
            record.update(path="augmented")
            if cfg.transfer_mode == "finetune":  # plot what fine-tuning made of the features
                test_x, _ = extract_features(model[0], test, device, min(bs, 512), cfg.workers, show=False)
        if cfg.transfer_mode != "knn":
            record.update(fc_epochs=cfg.fc_epochs, fc_lr=cfg.fc_lr, fc_batch_size=bs, fc_optimizer=cfg.fc_optimizer,
                          fc_weight_decay=cfg.fc_weight_decay)
        top1, top5 = topk_correct(scores, test_y)
        record.update(top1=100.0 * top1 / len(test_y), top5=100.0 * top5 / len(test_y))
        results.append(record)
        if dist.is_main:
            tag = f"{cfg.transfer_mode}{'' if cfg.semi_ratio is None else f'_semi{cfg.semi_ratio:g}'}"
            with open(os.path.join(out_dir, f"{tag}_epoch{epoch:04d}.json"), "w") as f:
                json.dump(record, f, indent=1)
            writer.add_scalar(f"eval/{tag}_top1", record["top1"], epoch)
            writer.add_scalar(f"eval/{tag}_top5", record["top5"], epoch)
            print(f"{tag} epoch {epoch}: top-1 {record['top1']:.2f}%  top-5 {record['top5']:.2f}%  "
                  f"({len(test_y)} test images)", flush=True)
    if dist.is_main:
        if cfg.tsne:
            names = _class_names(test)
            epoch = chosen[-1][0]
            png = os.path.join(out_dir, f"tsne_{cfg.transfer_mode}_epoch{epoch:04d}.png")
            plot_tsne(test_x, test_y, names, png, f"t-SNE of test backbone features ({cfg.transfer_mode}), "
                      f"checkpoint epoch {epoch}", cfg.seed)
            writer.add_embedding(test_x[:2000].cpu(), metadata=[names[int(c)] for c in test_y[:2000]],
                                 tag=f"test_features_epoch{epoch:04d}")
            print(f"t-SNE: {png}")
        if cfg.eval_all:
            summary = os.path.join(out_dir, f"{cfg.transfer_mode}_all_epochs")
            with open(summary + ".json", "w") as f:
                json.dump(results, f, indent=1)
            plot_accuracy_vs_epoch(results, summary + ".png",
                                   f"{cfg.transfer_mode} on {cfg.dataset_name} against pretraining epoch")
            print(f"accuracy against epoch: {summary}.png")
        writer.close()
        print(f"results in {out_dir}")
    return results


def _class_names(split: Split) -> list[str]:
    ds = split.dataset
    names = getattr(ds, "classes", None)
    return list(names) if names else [str(c) for c in range(split.num_classes)]
