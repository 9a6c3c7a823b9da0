"""Backbone features of a dataset split, weighted kNN on them, and the kNN monitor of pretraining.

Shared by pretraining (the online monitor) and evaluation (the ``knn`` protocol, cached-feature probes).
kNN as Wu et al. 2018 (InsDis) and lightly report it: the k most similar training images, by cosine
similarity of L2-normalised features, vote with weight exp(sim / T).

Under torchrun the evaluation protocols keep the training features sharded (``extract_shard``: rank r holds
images r, r+W, r+2W, ...), so their memory falls as ranks are added; ``knn_scores_sharded`` exchanges only each
rank's k best candidates per test image.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from common.distributed import (all_gather_object, all_reduce_sum, broadcast_tensor, gather_no_grad, get_rank,
                                get_world_size)
from data.datasets import Split, fixed_subset, load_split


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the k highest scores, for each k."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # (N, k_max)
    hit = top == labels[:, None]
    return [int(hit[:, : min(k, k_max)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
               num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores (N_test, C) of weighted kNN on cosine similarity, each row up to a positive factor."""
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)  # (B, k)
        out.append(_vote(sim, train_labels[idx], num_classes, temperature))
    return torch.cat(out)


def _vote(sim: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Each query's neighbours (sorted by ``sim``, the most similar first) vote for their labels."""
    # exp(sim/T) scaled by each query's exp(-max sim/T): the same vote ratios, so the same ranking, and
    # neither overflow nor an all-zero row at small T (the nearest neighbour weighs 1)
    weights = ((sim - sim[:, :1]) / temperature).exp()
    votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
    votes.scatter_add_(1, labels, weights)
    return votes


@torch.no_grad()
def knn_scores_sharded(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                       num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """``knn_scores`` of a training set whose rows are spread over the ranks, each rank passing its shard and the
    same whole test features (small, and every rank's scores need them all); in one process it is ``knn_scores``.
    Each rank finds every test image's k nearest rows in its shard, and only those candidates, (chunk, k)
    similarities and labels a rank, are gathered and merged: a rank holds its shard, a chunk's similarities to it
    and W chunks of candidates, never the whole training set. A global neighbour is among its own rank's k best,
    so the merge keeps the global top-k, with one caveat: among rows tied exactly at the k-th similarity it may
    keep another one than a single ``topk`` would (and so another label), and a product of other shapes may
    round a similarity differently in its last bit; either can move a near-tied vote only."""
    if get_world_size() == 1:
        return knn_scores(train_feats, train_labels, test_feats, num_classes, k, temperature, chunk)
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, int(all_reduce_sum(torch.tensor([train.shape[0]], device=train.device))))
    out = []
    for start in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim, labels = _merge_candidates(*_shard_candidates(q @ train.T, train_labels, k))
        out.append(_vote(sim, labels, num_classes, temperature))
    return torch.cat(out)


def _shard_candidates(sim: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar rows of this shard for each query, padded with -inf (never chosen: the ranks hold at
    least k rows together) where the shard has fewer than k rows, so every rank sends the same shape."""
    top, idx = sim.topk(min(k, sim.shape[1]), dim=1)
    pad = k - top.shape[1]
    return (F.pad(top, (0, pad), value=float("-inf")),
            F.pad(labels[idx], (0, pad)))


def _merge_candidates(sim: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global k best of every rank's k best (the global top-k is among them), sorted as ``topk`` sorts."""
    rows, k = sim.shape
    every_sim = gather_no_grad(sim).view(-1, rows, k).transpose(0, 1).reshape(rows, -1)  # (B, W*k)
    every_label = gather_no_grad(labels).view(-1, rows, k).transpose(0, 1).reshape(rows, -1)
    top, j = every_sim.topk(k, dim=1)
    return top, every_label.gather(1, j)


# ----------------------------------------------------------------------------- features
class Transformed(Dataset):
    """``(transform(image), label, index)`` items of an ``(image, label)`` dataset."""

    def __init__(self, base: Dataset, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        image, label = self.base[i]
        if isinstance(image, torch.Tensor):
            image = tv_tensors.Image(image)
        return self.transform(image), label, i


class CentreView(nn.Module):
    """The test view of one image, decided by its own size against the training size ``size``: an image whose
    shorter side is already ``size`` (CIFAR, in memory or as 32x32 files) keeps every pixel; a larger one is
    resized to 8/7 of ``size`` and centre-cropped (ImageNet's 256 -> 224); a smaller one is resized up."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.crop = v2.CenterCrop(size)
        self.larger = v2.Resize(int(round(size * 8 / 7)), antialias=True)
        self.smaller = v2.Resize(size, antialias=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        side = min(image.shape[-2:])
        if side > self.size:
            image = self.larger(image)
        elif side < self.size:
            image = self.smaller(image)
        return self.crop(image) if image.shape[-2:] != (self.size, self.size) else image


def test_transform(split: Split) -> v2.Compose:
    """Centre view of every image (``CentreView``), then the split's normalisation; used by every protocol
    and by the online kNN monitor."""
    return v2.Compose([v2.ToImage(), CentreView(split.image_size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(split.mean, split.std)])


@dataclass
class FeatureShard:
    """This rank's rows of a set of features (in one process, all of them): ``rows`` are their positions in
    the whole set, ascending, and ``total`` its size."""

    feats: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor
    total: int

    def select(self, positions: Sequence[int]) -> FeatureShard:
        """The shard of the subset ``whole[positions]`` (a semi-supervised label subset), in the order of
        ``positions``: this rank keeps the selected rows it holds, with their positions in the subset."""
        wanted = torch.as_tensor(positions, dtype=torch.long, device=self.rows.device)
        local, held = locate(self.rows, wanted)
        return FeatureShard(self.feats[local], self.labels[local], held.nonzero().squeeze(1), len(wanted))


def locate(rows: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(where in ``rows``, ascending, the ``wanted`` positions that it holds are; which of ``wanted`` it holds):
    a binary search, so no rank builds a map the size of the whole set."""
    if rows.numel() == 0:
        return rows, torch.zeros_like(wanted, dtype=torch.bool)
    j = torch.searchsorted(rows, wanted).clamp_(max=rows.numel() - 1)
    held = rows[j] == wanted
    return j[held], held


@torch.no_grad()
def extract_shard(backbone: nn.Module, split: Split, device: torch.device, batch_size: int, workers: int,
                  desc: str = "features", show: bool = True) -> FeatureShard:
    """This rank's share of a split's backbone features, images r, r+W, r+2W, ... (float32), written into one
    buffer allocated once the first batch tells the feature size: a list of batches concatenated at the end
    would hold the shard twice."""
    rank, world = get_rank(), get_world_size()
    n = len(split.dataset)
    mine = range(rank, n, world)
    # its own generator: a loader draws its workers' base seed from the global one otherwise, and a monitor or
    # the online probe would then change the random numbers a method draws later (InsDis's noise)
    loader = DataLoader(Subset(Transformed(split.dataset, test_transform(split)), mine), batch_size=batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda", generator=torch.Generator())
    was_training = backbone.training
    backbone.eval()
    feats, labels, done = None, torch.empty(0, dtype=torch.long, device=device), 0
    for x, y, _ in tqdm(loader, desc=desc, disable=not (show and rank == 0), leave=False, file=sys.stdout):
        out = backbone(x.to(device, non_blocking=True))
        if feats is None:
            feats = torch.empty(len(mine), out.shape[1], device=device)
            labels = torch.empty(len(mine), dtype=y.dtype, device=device)
        feats[done:done + len(out)] = out
        labels[done:done + len(out)] = y
        done += len(out)
    backbone.train(was_training)
    if feats is None:  # no image on this rank
        feats = torch.empty(0, 0, device=device)
    if n < world:  # fewer images than ranks: those without one take the feature size of those with one
        dim = max(all_gather_object(feats.shape[1]))
        feats = feats if len(feats) else torch.empty(0, dim, device=device)
    return FeatureShard(feats, labels, torch.arange(rank, n, world, device=device), n)


@torch.no_grad()
def extract_features(backbone: nn.Module, split: Split, device: torch.device, batch_size: int, workers: int,
                     desc: str = "features", show: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels of a whole split, in dataset order, on every rank: for what needs the whole
    matrix (the kNN monitor, t-SNE, the sklearn protocol, PCA, test logits). Each rank embeds its shard
    (``extract_shard``), then the shards are put in place one rank at a time."""
    shard = extract_shard(backbone, split, device, batch_size, workers, desc, show)
    return _interleave(shard.feats, shard.total), _interleave(shard.labels, shard.total)


# Bytes of one broadcast when the shards are put together: bounds what a rank holds besides the whole and its own.
INTERLEAVE_BYTES = 2**24


def _interleave(part: torch.Tensor, n: int) -> torch.Tensor:
    """The whole (n rows) from every rank's part, rank r's row j being row r + jW of the whole. Each rank's part
    is broadcast into place a few MB at a time, so a rank holds the whole, its own part and one piece: F(1 + 1/W)
    for F the whole, where an all-gather of padded parts, concatenated, then reordered, held about 3F."""
    rank, world = get_rank(), get_world_size()
    if world == 1:
        return part
    whole = part.new_empty((n, *part.shape[1:]))
    step = max(1, INTERLEAVE_BYTES // max(1, part.element_size() * math.prod(part.shape[1:])))
    for r in range(world):
        rows = len(range(r, n, world))
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            piece = part[start:stop] if r == rank else part.new_empty((stop - start, *part.shape[1:]))
            whole[r::world][start:stop] = broadcast_tensor(piece, r)
    return whole


class KnnMonitor:
    """kNN top-1 on the test split during pretraining (``--eval_every_n_epochs``), labelled train split
    as the memory: the number that tells a user early whether a run is learning."""

    def __init__(self, dataset_name: str, data_root: str, image_size: int, device: torch.device, workers: int,
                 k: int, temperature: float, download: bool = False, skip_bad_images: bool = False,
                 memory_subset: int | None = None, subset_seed: int = 0) -> None:
        self.train = load_split(dataset_name, data_root, train=True, download=download, image_size=image_size,
                                skip_bad_images=skip_bad_images)
        if memory_subset is not None:  # --eval_train_subset
            self.train = fixed_subset(self.train, memory_subset, subset_seed, "eval_train_subset")
        self.test = load_split(dataset_name, data_root, train=False, download=download, image_size=image_size,
                               skip_bad_images=skip_bad_images)
        self.device, self.workers, self.k, self.t = device, workers, k, temperature

    def measure(self, backbone: nn.Module) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
        """(kNN top-1 in %, the test split's (features, labels)): the online probe scores the same features."""
        train = extract_shard(backbone, self.train, self.device, 512, self.workers, show=False)  # sharded, as eval
        test_x, test_y = extract_features(backbone, self.test, self.device, 512, self.workers, show=False)
        scores = knn_scores_sharded(train.feats, train.labels, test_x, self.train.num_classes, self.k, self.t)
        return 100.0 * topk_correct(scores, test_y, ks=(1,))[0] / len(test_y), (test_x, test_y)
