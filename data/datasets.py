"""Datasets. Every entry of ``DATASETS`` loads one split as a map-style dataset yielding
``(image, label)``, where ``image`` is a uint8 CHW tensor (in-memory sets) or a PIL image (folders),
plus the facts the pipeline needs (image size, normalisation, classes).

* cifar10 / cifar100 / stl10: torchvision readers under ``--data`` (``--download`` fetches them);
  STL-10 pretrains on ``train+unlabeled`` (105k images).
* imagenet: ImageFolder at ``<data>/imagenet/{train,val}``; folder: ImageFolder at ``<data>/{train,test}``.
  Both walk their folders with :func:`folder_samples` (symbolic-link loops and duplicates refused or counted
  once), their test split must have the training split's class folders, and a 16-bit image is scaled to 8 bits
  (:func:`read_image`).
* digits: scikit-learn's bundled 8x8 digits (no file needed), upscaled to 32x32 RGB, with a fixed
  stratified 80/20 train/test split.
* images: every image under ``--data`` at any depth, without labels: pretraining only (:class:`ImageFiles`).
* fashion_mnist: Fashion-MNIST's four IDX files (60k/10k greyscale 28x28), read where they are, gzipped or not,
  in the flat layout Zalando and Debian's ``dataset-fashion-mnist`` publish or in torchvision's
  ``<root>/FashionMNIST/raw/``; nothing is written under ``--data`` (``--download`` aside).
"""
from __future__ import annotations

import functools
import gzip
import multiprocessing
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

from common.distributed import launched_rank
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
    greyscale: bool = False  # grey images held as 3 equal channels: no hue, saturation or grayscale augmentation


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


FMNIST_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530  # of the 60,000 training images (tests/test_fashion_mnist.py)
DEFAULT_DATA = "./datasets"  # --data's default
SYSTEM_FMNIST = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist installs the files


def read_idx(path: str, dims: int) -> torch.Tensor:
    """A uint8 IDX file (gzipped when its name ends in .gz) as a tensor of ``dims`` dimensions. The layout is
    torchvision's (``datasets.mnist.read_sn3_pascalvincent_tensor``: magic 0x08 0x<dims>, big-endian sizes, then
    the bytes); it is read here because torchvision's reader opens only uncompressed files and asserts on a bad
    header, where this one says what is wrong with which file."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # zlib.error: a damaged gzip stream
        raise UserError(f"cannot read {path} ({err}); replace it with the original file") from err
    sizes = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    if len(data) < 4 + 4 * dims or data[:4] != bytes([0, 0, 8, dims]) \
            or len(data) != 4 + 4 * dims + int(np.prod(sizes)):
        raise UserError(f"{path} is not a uint8 IDX file of {dims} dimension(s) (wrong header or length); "
                        "replace it with the original file")
    return torch.frombuffer(bytearray(data[4 + 4 * dims:]), dtype=torch.uint8).view(*sizes)


def fmnist_roots(root: str) -> list[str]:
    """Where Fashion-MNIST's files are looked for, in order: ``root``, torchvision's ``root/FashionMNIST/raw``,
    ``root/fashion-mnist``, and with the default ``--data`` also Debian's package folder."""
    roots = [root, os.path.join(root, "FashionMNIST", "raw"), os.path.join(root, "fashion-mnist")]
    return roots + ([SYSTEM_FMNIST] if os.path.normpath(root) == os.path.normpath(DEFAULT_DATA) else [])


def _fmnist_file(root: str, name: str) -> str | None:
    for folder in fmnist_roots(root):
        for candidate in (os.path.join(folder, name + ".gz"), os.path.join(folder, name)):
            if os.path.isfile(candidate):
                return candidate
    return None


def _fashion_mnist(root: str, train: bool, download: bool, **_) -> Split:
    names = FMNIST_FILES[train]
    found = [_fmnist_file(root, name) for name in names]
    if None in found and download:
        import urllib.error

        import torchvision.datasets as tvd

        try:
            tvd.FashionMNIST(root, train=train, download=True)
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            raise UserError(f"could not download Fashion-MNIST into {os.path.join(root, 'FashionMNIST')} "
                            f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); without a network, "
                            "apt-get install dataset-fashion-mnist, or copy the four IDX files into --data") from err
        found = [_fmnist_file(root, name) for name in names]
    if None in found:
        missing = names[found.index(None)]
        raise UserError(f"Fashion-MNIST not found: no {missing}[.gz] in {' or '.join(fmnist_roots(root))}; pass "
                        "--data DIR holding the four IDX files, --download to fetch them, or apt-get install "
                        f"dataset-fashion-mnist (it installs them in {SYSTEM_FMNIST})")
    images, labels = read_idx(found[0], 3), read_idx(found[1], 1).long()
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{found[0]} holds {images.shape[0]} images but {found[1]} {labels.shape[0]} labels; "
                        "replace them with the original files")
    # 3 equal channels: torchvision's ResNets (and an export into one) take RGB. Native 28 px: the crop resamples
    # anyway, and 28 px costs 0.77x the compute of 32.
    images = images[:, None].expand(-1, 3, -1, -1).contiguous()
    return Split(TensorImages(images, labels), 10, 28, (FMNIST_MEAN,) * 3, (FMNIST_STD,) * 3, True, greyscale=True)


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
        except (RuntimeError, OSError) as err:  # OSError: urllib's URLError without a network
            if not download and isinstance(err, RuntimeError):
                raise UserError(
                    f"{name} not found in {os.path.join(root, folder)}; pass --download to fetch it, "
                    f"or --data DIR where DIR holds {folder}/"
                ) from err
            if not download:
                raise
            reason = str(getattr(err, "reason", None) or err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"could not download {name} into {root} ({reason}); without a network, copy "
                            f"{folder}/ into {root} from a machine that has one") from err
        return Split(TensorImages(images, labels), classes, size, mean, std, True)

    return load


@functools.lru_cache(maxsize=1)
def image_errors() -> tuple:
    """What PIL raises for a file it cannot read (PIL imported only when images are read)."""
    from PIL import Image

    return OSError, ValueError, SyntaxError, Image.DecompressionBombError


class RunWarning:
    """A warning printed once per run (by rank 0), also when the DataLoader workers meet its cause: the flag is
    in shared memory, made by the main process when it loads a dataset (:func:`load_split`), before it forks
    workers, which inherit it. Without shared memory (or with workers started by spawn, which do not inherit it)
    each process warns once. ``reset`` starts a new run in the same process (tests)."""

    def __init__(self) -> None:
        self.shared, self.local = None, False

    def arm(self) -> None:
        if self.shared is None:
            try:
                self.shared = multiprocessing.Value("b", 0)
            except (OSError, ImportError):  # no shared memory here: once per process
                pass

    def reset(self) -> None:
        self.local = False
        if self.shared is not None:
            self.shared.value = 0

    def first(self) -> bool:
        """True the first time it is asked in the run, False after."""
        if self.shared is None:
            first, self.local = not self.local, True
            return first
        with self.shared.get_lock():
            first, self.shared.value = not self.shared.value, 1
        return bool(first)

    def warn(self, message: str) -> None:
        if self.first() and launched_rank() == 0:
            print(f"warning: {message}", file=sys.stderr, flush=True)


SIXTEEN_BIT = RunWarning()  # a 16-bit image scaled to 8 bits
REPEATS = RunWarning()  # a folder or image reached twice through symbolic links


def reset_run_warnings() -> None:
    """A new run in the same process (tests): the once-a-run warnings may be printed again."""
    SIXTEEN_BIT.reset()
    REPEATS.reset()


def to_rgb(img, path: str):
    """An RGB PIL image of ``img``. A 16-bit grayscale image (a 16-bit PNG opens as mode "I;16" or "I") is scaled
    to 8 bits first (round(v / 257): 65535 -> 255), where PIL's own conversion clips every value above 255 and
    makes it nearly all white; the first such file of a run is named in one warning."""
    from PIL import Image

    if img.mode == "I" or img.mode.startswith("I;16"):
        values = np.asarray(img).astype(np.int64).clip(0, 65535)  # "I" holds int32; "I;16B" big-endian
        img = Image.fromarray(((values + 128) // 257).astype(np.uint8))  # round half up: no ties occur
        SIXTEEN_BIT.warn(f"{path} is a 16-bit image; its values are scaled to 8 bits")
    return img.convert("RGB")


def read_image(path: str):
    """An RGB PIL image, fully decoded here so that a truncated file fails now, naming itself."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img, path)
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


def folder_samples(directory: str, class_to_idx: dict[str, int],
                   extensions: tuple[str, ...] = IMG_EXTENSIONS) -> list[tuple[str, int]]:
    """(path, class index) of every image under ``directory/<class>/``, in torchvision's ImageFolder order, from
    a walk that follows symbolic links as torchvision's does, but safely (torchvision's follows them blindly: a
    link ``train/a/loop -> ..`` made 72 files into 2,952 samples):

    * a folder whose real path is one the walk is in (itself or an ancestor), or holds one, is a loop: a
      ``UserError`` naming the link and where it leads back to;
    * a folder or image reached a second time within its class (through another link) is counted once (the
      real folder or file rather than a link to it), with one warning a run naming the first such repeat;
    * a folder or image reached from two classes (two class folders that are one directory, a link from one
      class into another) is a ``UserError``: its label would be ambiguous.
    """
    root_real = os.path.realpath(directory)
    folders: dict[str, tuple[str, str]] = {}  # real path -> (the path it was first walked as, its class)
    images: dict[str, tuple[str, str]] = {}
    repeats: list[tuple[str, str]] = []  # (path, the path it repeats) within one class
    samples, available = [], set()
    for cls in sorted(class_to_idx):
        top = os.path.join(directory, cls)
        if not os.path.isdir(top):
            continue
        listing: list[tuple[str, str, list[tuple[str, bool]]]] = []  # (folder, its real path, [(file, is link)])
        _walk(top, os.path.realpath(top), cls, [(directory, root_real)], folders, repeats, listing)
        found = [(os.path.join(folder, name), os.path.realpath(os.path.join(folder, name)) if link
                  else os.path.join(real, name), link)
                 for folder, real, names in sorted(listing)  # torchvision sorts its walk by folder, then files
                 for name, link in sorted(names) if has_file_allowed_extension(name, extensions)]
        kept = set()
        for path, key, link in sorted(found, key=lambda f: f[2]):  # files first, then links to them (stable)
            if key in images:
                _repeated(path, *images[key], cls, "image", repeats)
                continue
            images[key] = (path, cls)
            kept.add(path)
        samples += [(path, class_to_idx[cls]) for path, _, _ in found if path in kept]
        available.update([cls] if kept else [])
    empty = sorted(set(class_to_idx) - available)
    if empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}. "
                                f"Supported extensions are: {', '.join(extensions)}")
    if repeats:
        (path, first), more = repeats[0], len(repeats) - 1
        REPEATS.warn(f"{path} is {first} again (through a symbolic link); it is counted once"
                     + (f", as are {more} more such repeat(s) under {directory}" if more else ""))
    return samples


def _walk(path: str, real: str, cls: str, chain: list[tuple[str, str]], folders: dict, repeats: list,
          listing: list) -> None:
    """Adds the folder ``path`` (real path ``real``) and the folders below it to ``listing``; ``chain``: the
    (path, real path) of the folders above it."""
    for above, above_real in chain:
        if real == above_real or above_real.startswith(real.rstrip(os.sep) + os.sep):
            leads_to = above if real == above_real else real
            raise UserError(f"{path} is a symbolic link back into {leads_to} (a loop); remove it, or point it "
                            "outside that folder")
    if real in folders:
        _repeated(path, *folders[real], cls, "folder", repeats)
        return
    folders[real] = (path, cls)
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError:  # an unreadable folder is passed over, as os.walk does
        return
    subdirs, files = [], []
    for entry in entries:
        try:
            is_dir = entry.is_dir()  # follows a link
        except OSError:
            is_dir = False
        (subdirs if is_dir else files).append(entry)
    listing.append((path, real, [(e.name, e.is_symlink()) for e in files]))
    for entry in sorted(subdirs, key=lambda e: (e.is_symlink(), e.name)):  # a real folder before a link to it
        sub_real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
        _walk(entry.path, sub_real, cls, chain + [(path, real)], folders, repeats, listing)


def _repeated(path: str, first: str, first_cls: str, cls: str, what: str, repeats: list) -> None:
    if first_cls != cls:
        raise UserError(f"{path} and {first} are the same {what} (through a symbolic link), in classes {first_cls} "
                        f"and {cls}; an image must belong to one class: remove the link")
    repeats.append((path, first))


class LinkSafeImageFolder(ImageFolder):
    """torchvision's ImageFolder whose walk is :func:`folder_samples` (no symbolic-link loop, nothing counted
    twice)."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return folder_samples(str(directory), class_to_idx, extensions or IMG_EXTENSIONS)


def _listed(names: list[str], most: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_test_classes(test_classes: list[str], train_path: str, test_path: str) -> None:
    """The test split's class folders must be the training split's: labels are the index of a folder's name among
    the sorted names, so a renamed, extra or missing test folder would score against the wrong classes. Nothing
    to compare when there is no training split there."""
    try:
        train_classes, _ = find_classes(train_path)
    except OSError:  # no (readable) training split: its own load says so
        return
    only_train = sorted(set(train_classes) - set(test_classes))
    only_test = sorted(set(test_classes) - set(train_classes))
    if only_train or only_test:
        raise UserError(f"the class folders of {test_path} are not those of {train_path}: only in train: "
                        f"{_listed(only_train)}; only in test: {_listed(only_test)}; name the test folders as the "
                        "training ones (a label is a folder name's place among the sorted names)")


def _image_folder(subdir: Callable[[str, bool], str], hint: str) -> Callable[[str, bool, bool], Split]:
    def load(root: str, train: bool, download: bool, image_size: int | None = None, **_) -> Split:
        path = subdir(root, train)
        if download:
            raise UserError(f"--download is not available for this dataset; place the images under {path}")
        if not os.path.isdir(path):
            raise UserError(f"no image folder at {path}; {hint}")
        try:
            ds = LinkSafeImageFolder(path, loader=read_image)
        except (FileNotFoundError, RuntimeError) as err:
            raise UserError(f"no images found under {path} ({err}); {hint}") from err
        if not train:
            check_test_classes(ds.classes, subdir(root, True), path)
        size = image_size
        if size is None:  # square images keep their size (e.g. CIFAR as PNG), others crop to 224
            w, h = _first_readable_size(ds.samples)
            size = w if w == h else 224
        return Split(ds, len(ds.classes), size, IMAGENET_MEAN, IMAGENET_STD, False)

    return load


class ImageFiles(Dataset):
    """Every image under a folder, at any depth, without labels (each item's label is 0): ``--dataset_name
    images``, for pretraining on what a user has. The walk does not follow symbolic links to folders (no loop);
    files are in sorted path order."""

    classes = ["unlabelled"]

    def __init__(self, root: str, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> None:
        self.samples = [(os.path.join(folder, name), 0)
                        for folder, _, files in sorted(os.walk(root))
                        for name in sorted(files) if has_file_allowed_extension(name, extensions)]
        self.targets = [0] * len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return read_image(self.samples[i][0]), 0


UNLABELLED = ("images",)  # datasets without labels: pretraining only


def _unlabelled(root: str, train: bool, download: bool, image_size: int | None = None, **_) -> Split:
    if download:
        raise UserError(f"--download is not available for --dataset_name images; place the images under {root}")
    if not train:
        raise UserError("--dataset_name images has no labels and no test split, which evaluation needs; evaluate "
                        "with a labelled folder: --dataset_name folder --data DIR (DIR/train/<class>/, "
                        "DIR/test/<class>/)")
    if not os.path.isdir(root):
        raise UserError(f"no folder at {root}; --dataset_name images reads every image under --data, at any depth")
    ds = ImageFiles(root)
    if not ds.samples:
        raise UserError(f"no image under {root} (extensions {', '.join(IMG_EXTENSIONS)}); --dataset_name images "
                        "reads every image under --data, at any depth")
    size = image_size
    if size is None:  # square images keep their size, others crop to 224 (as a labelled folder)
        w, h = _first_readable_size(ds.samples)
        size = w if w == h else 224
    return Split(ds, 1, size, IMAGENET_MEAN, IMAGENET_STD, False)


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
    "fashion_mnist": _fashion_mnist,
    "images": _unlabelled,
}


FILELESS = ("digits",)  # datasets that read nothing under --data


def data_root(name: str, root: str) -> str | None:
    """The absolute data root dataset ``name`` reads under ``root`` (None for one that reads no file)."""
    return None if name in FILELESS else os.path.abspath(root)


def load_split(name: str, root: str, train: bool, download: bool = False, pretrain: bool = False,
               image_size: int | None = None, skip_bad_images: bool = False) -> Split:
    """One split of dataset ``name``; user-fixable problems raise :class:`UserError`."""
    split = DATASETS[name](root, train, download, pretrain=pretrain, image_size=image_size)
    if not split.in_memory:
        SIXTEEN_BIT.arm()  # here, before any DataLoader worker starts: the workers share the warning's flag
    if skip_bad_images and not split.in_memory:
        split.dataset = SkipBadImages(split.dataset)
    if image_size is not None:
        split.image_size = image_size
    if len(split.dataset) == 0:
        raise UserError(f"dataset {name} under {root} is empty")
    return split


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Every image's label, in dataset order, without reading an image where the dataset holds its labels
    (in memory, an image folder's samples, a subset of either); -1 marks an unlabelled image (STL-10's
    unlabeled part)."""
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    for name in ("labels", "targets"):
        held = getattr(dataset, name, None)
        if held is not None:
            return torch.as_tensor(held, dtype=torch.long).reshape(-1)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore


def hold_out(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(the rest, a held-out ``fraction``) of a split, drawn once from ``seed``: sthalles/SimCLR's --valid_size.
    In-memory datasets keep their tensors (so --faster_version works on both), image folders their samples."""
    n = len(split.dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, round(fraction * n))
    return take(split, order[held:].sort().values), take(split, order[:held].sort().values)


def fixed_subset(split: Split, n: int, seed: int, flag: str) -> Split:
    """``n`` images of ``split`` drawn once from ``seed`` (the same images for every run given that seed, whatever
    its training seed): ``--train_subset`` / ``--eval_train_subset`` with ``--subset_seed``."""
    total = len(split.dataset)
    if n > total:
        raise UserError(f"--{flag} {n} is more than the {total} images of the training set; lower --{flag} or "
                        "drop it")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return take(split, order[:n].sort().values)


def take(split: Split, idx: torch.Tensor) -> Split:
    """The images ``idx`` of a split, as a split of the same kind."""
    import copy

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
    return Split(part, split.num_classes, split.image_size, split.mean, split.std,
                 split.in_memory and isinstance(part, TensorImages), split.greyscale)
