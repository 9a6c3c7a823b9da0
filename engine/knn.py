"""Backbone features of a dataset split, weighted kNN on them, and the kNN monitor of pretraining.

Shared by pretraining (the online monitor) and evaluation (the ``knn`` protocol, cached-feature probes).
kNN as Wu et al. 2018 (InsDis) and lightly report it: the k most similar training images, by cosine
similarity of L2-normalised features, vote with weight exp(sim / T).
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from common.distributed import gather_no_grad, get_rank, get_world_size
from data.datasets import Split, load_split


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
        # exp(sim/T) scaled by each query's exp(-max sim/T): the same vote ratios, so the same ranking, and
        # neither overflow nor an all-zero row at small T (the nearest neighbour weighs 1)
        weights = ((sim - sim[:, :1]) / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        out.append(votes)
    return torch.cat(out)


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


@torch.no_grad()
def extract_features(backbone: nn.Module, split: Split, device: torch.device, batch_size: int, workers: int,
                     desc: str = "features", show: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels of a whole split, in dataset order. Each rank embeds every
    W-th image and the shards are gathered, so all ranks return the full tensors."""
    rank, world = get_rank(), get_world_size()
    n = len(split.dataset)
    mine = list(range(rank, n, world))
    per_rank = math.ceil(n / world)
    loader = DataLoader(Subset(Transformed(split.dataset, test_transform(split)), mine), batch_size=batch_size,
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

    def __init__(self, dataset_name: str, data_root: str, image_size: int, device: torch.device, workers: int,
                 k: int, temperature: float, download: bool = False, skip_bad_images: bool = False) -> None:
        self.train = load_split(dataset_name, data_root, train=True, download=download, image_size=image_size,
                                skip_bad_images=skip_bad_images)
        self.test = load_split(dataset_name, data_root, train=False, download=download, image_size=image_size,
                               skip_bad_images=skip_bad_images)
        self.device, self.workers, self.k, self.t = device, workers, k, temperature

    def __call__(self, backbone: nn.Module) -> float:
        train_x, train_y = extract_features(backbone, self.train, self.device, 512, self.workers, show=False)
        test_x, test_y = extract_features(backbone, self.test, self.device, 512, self.workers, show=False)
        scores = knn_scores(train_x, train_y, test_x, self.train.num_classes, self.k, self.t)
        return 100.0 * topk_correct(scores, test_y, ks=(1,))[0] / len(test_y)
