"""Pretraining loaders: the standard one (DataLoader workers make the views) and the device-resident one
(``--faster_version``: the dataset as uint8 on the training device, views made there in batches).

Both yield ``(list of views, dataset indices)`` and come with the objects to call ``set_epoch`` on (the
device loader itself, or the standard loader's sampler); both take explicit arguments, so benchmarks and
tests build them without a config.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from common.errors import BadImage, UserError
from data.augment import EpochSampler, MultiViewDataset, ViewSpec, default_jitter_strength, view_transform
from data.batched_augment import BatchedViews, DeviceLoader
from data.datasets import Split, image_files, read_image
from data.hybrid import HybridItems, HybridLoader, collate

MAX_RESIDENT_BYTES = 16 * 2**30  # --faster_version keeps the dataset in device memory up to this size


def resident_images(split: Split, dataset_name: str, skip_bad_images: bool = False) -> torch.Tensor:
    """All images of ``split`` as one uint8 (N, 3, H, W) tensor, for the device-resident fast path.
    In-memory datasets hand over their tensor; an image folder is read when every image has one size
    (unreadable images stop it with their name, or are left out with ``skip_bad_images``)."""
    if split.in_memory:
        return split.dataset.images
    if dataset_name not in ("folder", "images"):  # ImageNet-sized folders do not fit; a folder of small ones may
        raise UserError(f"--faster_version keeps the dataset in memory, which {dataset_name} does not fit; "
                        "drop --faster_version for this dataset")
    samples = image_files(split.dataset)  # also through --skip_bad_images and a subset (--train_subset)
    n = len(samples)
    images, size, skipped = [], None, []
    for path, _ in tqdm(samples, desc="loading images", leave=False, file=sys.stdout):
        try:
            img = read_image(path)
        except BadImage:
            if not skip_bad_images:
                raise
            skipped.append(path)
            continue
        if size is None:
            size = img.size
            if n * 3 * size[0] * size[1] > MAX_RESIDENT_BYTES:
                raise UserError(f"--faster_version: {n} images of {size[0]}x{size[1]} need "
                                f"{n * 3 * size[0] * size[1] / 2**30:.1f} GiB, more than the "
                                f"{MAX_RESIDENT_BYTES / 2**30:.0f} GiB limit; drop --faster_version")
        if img.size != size:
            raise UserError(f"--faster_version needs images of one size; {path} is {img.size[0]}x{img.size[1]}, "
                            f"not {size[0]}x{size[1]}; drop --faster_version")
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    if skipped:
        print(f"warning: left out {len(skipped)} unreadable image(s), the first {skipped[0]}", file=sys.stderr)
    if not images:
        raise UserError("no image of the dataset can be read")
    return torch.stack(images)


def pretrain_loader(split: Split, views: list[ViewSpec], batch_size: int, seed: int, *, dataset_name: str = "",
                    rank: int = 0, world_size: int = 1, workers: int = 0, device: torch.device | None = None,
                    faster: bool = False, jitter_strength: float | None = None, min_crop_scale: float = 0.08,
                    skip_bad_images: bool = False, pipeline: str = "standard", decode_on_gpu: bool = False):
    """The loader of ``split`` with one view per entry of ``views``; ``batch_size`` is the global batch.
    Returns ``(loader, epoch_setters)``: call ``set_epoch(e)`` on each setter before epoch ``e``.

    ``pipeline``: "standard" (workers make the finished views) or "hybrid" (workers crop, the device does the
    colour work: data/hybrid.py); ``decode_on_gpu`` (hybrid) leaves the JPEG decoding to the device too."""
    device = device or torch.device("cpu")
    size = split.image_size
    n = len(split.dataset)
    if n < batch_size:
        raise UserError(f"--batch_size {batch_size} is larger than the dataset ({n} images); lower --batch_size")
    strength = jitter_strength if jitter_strength is not None else default_jitter_strength(size)
    if faster:
        batched = [BatchedViews(size, spec, strength, min_crop_scale, split.mean, split.std, split.greyscale) for spec in views]
        loader = DeviceLoader(resident_images(split, dataset_name, skip_bad_images).to(device), batched, batch_size,
                              seed, rank, world_size)
        return loader, [loader]
    if pipeline == "hybrid" or decode_on_gpu:
        batched = [BatchedViews(size, spec, strength, min_crop_scale, split.mean, split.std, split.greyscale) for spec in views]
        dataset = HybridItems(split.dataset, batched, seed, encoded=decode_on_gpu, skip_bad_images=skip_bad_images)
    else:
        transforms = [view_transform(size, spec, strength, min_crop_scale, split.mean, split.std,
                                     split.greyscale) for spec in views]
        dataset = MultiViewDataset(split.dataset, transforms, seed=seed)
    # The sampler's order depends only on (seed, epoch); with W ranks the union of their step-k
    # batches is exactly the one-process step-k batch of the same global size.
    # Workers persist across epochs (no start-up wait at each epoch); the sampler hands them the epoch.
    sampler = EpochSampler(DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                              drop_last=True), batch_size=batch_size // world_size)
    # Its own generator: otherwise each iter() draws the workers' base seed from the global RNG, which the
    # methods use too (InsDis's noise), and a run resumed inside an epoch would draw it at another point.
    # Two batches in flight per worker: enough to hide a slow file, and (workers x 2 + 1) batches of shared memory
    # a rank instead of (workers x 4 + 1).
    loader = DataLoader(dataset, batch_size=batch_size // world_size, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
                        prefetch_factor=2 if workers > 0 else None, generator=torch.Generator().manual_seed(seed),
                        collate_fn=collate if isinstance(dataset, HybridItems) else None)
    if isinstance(dataset, HybridItems):
        return HybridLoader(loader, dataset, device), [sampler]
    return loader, [sampler]
