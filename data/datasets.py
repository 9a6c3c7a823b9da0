"""Datasets. Every entry of ``DATASETS`` loads one split as a map-style dataset yielding
``(image, label)``, where ``image`` is a uint8 CHW tensor (in-memory sets) or a PIL image (folders),
plus the facts the pipeline needs (image size, normalisation, classes).

* cifar10 / cifar100 / stl10: torchvision readers under ``--data`` (``--download`` fetches them);
  STL-10 pretrains on ``train+unlabeled`` (105k images).
* imagenet: ImageFolder at ``<data>/imagenet/{train,val}``; folder: ImageFolder at ``<data>/{train,test}``.
* digits: scikit-learn's bundled 8x8 digits (no file needed), upscaled to 32x32 RGB, with a fixed
  stratified 80/20 train/test split.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from common.errors import BadImage, UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Split:
    dataset: Dataset
    num_classes: int
    image_size: int  # side of the (square) training crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    in_memory: bool  # uint8 tensors rather than files


class TensorImages(Dataset):
    """uint8 images (N, 3, H, W) with integer labels, held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def _digits(root: str, train: bool, download: bool, **_) -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.2, stratify=y, random_state=0)
    idx = torch.tensor(idx_train if train else idx_test)
    img = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8)[idx] / 16.0  # values 0..16
    img = F.interpolate(img, size=32, mode="bilinear", align_corners=False).clamp(0, 1)
    images = (img * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    # Normalisation from the full (train+test) set, so it does not depend on the split.
    mean, std = float(x.mean() / 16.0), float(x.std() / 16.0)
    return Split(TensorImages(images, torch.tensor(y)[idx]), 10, 32, (mean,) * 3, (std,) * 3, True)


def _torchvision_set(name: str, folder: str, mean, std, size: int) -> Callable[[str, bool, bool], Split]:
    def load(root: str, train: bool, download: bool, pretrain: bool = False, **_) -> Split:
        import torchvision.datasets as tvd

        try:
            if name == "stl10":
                split = ("train+unlabeled" if pretrain else "train") if train else "test"
                ds = tvd.STL10(root, split=split, download=download)
                images, labels, classes = torch.from_numpy(ds.data), torch.from_numpy(ds.labels), 10
            else:
                cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
                ds = cls(root, train=train, download=download)
                images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
                labels, classes = torch.tensor(ds.targets), len(ds.classes)
        except RuntimeError as err:
            if not download:
                raise UserError(
                    f"{name} not found in {os.path.join(root, folder)}; pass --download to fetch it, "
                    f"or --data DIR where DIR holds {folder}/"
                ) from err
            raise UserError(f"could not download {name} into {root}: {err}") from err
        return Split(TensorImages(images, labels), classes, size, mean, std, True)

    return load


@functools.lru_cache(maxsize=1)
def image_errors() -> tuple:
    """What PIL raises for a file it cannot read (PIL imported only when images are read)."""
    from PIL import Image

    return OSError, ValueError, SyntaxError, Image.DecompressionBombError


def read_image(path: str):
    """An RGB PIL image, fully decoded here so that a truncated file fails now, naming itself."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except image_errors() as err:
        raise BadImage(f"cannot read image {path} ({str(err).splitlines()[0] if str(err) else type(err).__name__});"
                       " replace or remove it, or pass --skip_bad_images") from err


class SkipBadImages(Dataset):
    """``--skip_bad_images``: an unreadable image is replaced by the next readable one (with its label),
    with one warning per process naming the first such file."""

    def __init__(self, base: Dataset) -> None:
        self.base, self.warned = base, False
        self.samples, self.classes = getattr(base, "samples", None), getattr(base, "classes", None)
        self.targets = getattr(base, "targets", None)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        return first_readable(self.base.__getitem__, i, len(self), self)


def first_readable(read: Callable[[int], object], i: int, n: int, owner, skip: bool = True):
    """``read(i)``, or (``skip``) that of the next readable of the ``n`` items: --skip_bad_images' rule, with one
    warning per process (``owner.warned``) naming the first unreadable file."""
    for j in range(n if skip else 1):
        try:
            return read((i + j) % n)
        except BadImage as err:
            if not skip:
                raise
            if not owner.warned:
                owner.warned = True
                print(f"warning: skipping unreadable images ({err}); each is replaced by the next readable one",
                      file=sys.stderr)
    raise UserError("no image of the dataset can be read")


def image_files(dataset: Dataset) -> list | None:
    """(path, label) of each item of an image folder, also through SkipBadImages and a held-out Subset; None
    for an in-memory dataset."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = image_files(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    if isinstance(dataset, SkipBadImages):
        dataset = dataset.base
    return getattr(dataset, "samples", None)


def _first_readable_size(samples) -> tuple[int, int]:
    from PIL import Image

    for path, _ in samples:
        try:
            with Image.open(path) as first:
                return first.size
        except (OSError, ValueError, SyntaxError):
            continue
    raise UserError(f"no image under {os.path.dirname(os.path.dirname(samples[0][0]))} can be read")


def _image_folder(subdir: Callable[[str, bool], str], hint: str) -> Callable[[str, bool, bool], Split]:
    def load(root: str, train: bool, download: bool, image_size: int | None = None, **_) -> Split:
        from torchvision.datasets import ImageFolder

        path = subdir(root, train)
        if download:
            raise UserError(f"--download is not available for this dataset; place the images under {path}")
        if not os.path.isdir(path):
            raise UserError(f"no image folder at {path}; {hint}")
        try:
            ds = ImageFolder(path, loader=read_image)
        except (FileNotFoundError, RuntimeError) as err:
            raise UserError(f"no images found under {path} ({err}); {hint}") from err
        size = image_size
        if size is None:  # square images keep their size (e.g. CIFAR as PNG), others crop to 224
            w, h = _first_readable_size(ds.samples)
            size = w if w == h else 224
        return Split(ds, len(ds.classes), size, IMAGENET_MEAN, IMAGENET_STD, False)

    return load


DATASETS: dict[str, Callable[..., Split]] = {
    "cifar10": _torchvision_set("cifar10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465),
                                (0.2470, 0.2435, 0.2616), 32),
    "cifar100": _torchvision_set("cifar100", "cifar-100-python", (0.5071, 0.4865, 0.4409),
                                 (0.2673, 0.2564, 0.2762), 32),
    "stl10": _torchvision_set("stl10", "stl10_binary", (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), 96),
    "imagenet": _image_folder(
        lambda root, train: os.path.join(root, "imagenet", "train" if train else "val"),
        "put ImageNet at <data>/imagenet/{train,val}/<class>/*.JPEG or pass --data",
    ),
    "folder": _image_folder(
        lambda root, train: os.path.join(root, "train" if train else "test"),
        "--data must hold train/<class>/<image> (and test/<class>/<image> for evaluation)",
    ),
    "digits": _digits,
}


def load_split(name: str, root: str, train: bool, download: bool = False, pretrain: bool = False,
               image_size: int | None = None, skip_bad_images: bool = False) -> Split:
    """One split of dataset ``name``; user-fixable problems raise :class:`UserError`."""
    split = DATASETS[name](root, train, download, pretrain=pretrain, image_size=image_size)
    if skip_bad_images and not split.in_memory:
        split.dataset = SkipBadImages(split.dataset)
    if image_size is not None:
        split.image_size = image_size
    if len(split.dataset) == 0:
        raise UserError(f"dataset {name} under {root} is empty")
    return split


def hold_out(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(the rest, a held-out ``fraction``) of a split, drawn once from ``seed``: sthalles/SimCLR's --valid_size.
    In-memory datasets keep their tensors (so --faster_version works on both), image folders their samples."""
    import copy

    n = len(split.dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, round(fraction * n))
    parts = []
    for idx in (order[held:].sort().values, order[:held].sort().values):
        ds = split.dataset
        if isinstance(ds, TensorImages):
            part: Dataset = TensorImages(ds.images[idx], ds.labels[idx])
        elif getattr(ds, "samples", None) is not None and not isinstance(ds, SkipBadImages):
            part = copy.copy(ds)
            part.samples = [ds.samples[i] for i in idx.tolist()]
            part.imgs = part.samples
            part.targets = [s[1] for s in part.samples]
        else:
            part = torch.utils.data.Subset(ds, idx.tolist())
        parts.append(Split(part, split.num_classes, split.image_size, split.mean, split.std,
                           split.in_memory and isinstance(part, TensorImages)))
    return parts[0], parts[1]
