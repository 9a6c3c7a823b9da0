"""Rotations on the training device, for MetaContrastive's two tricks (Ni et al. 2022):

* task augmentation (``--rot_task_p p``): each image of the batch is picked with probability p, and all the
  views of a picked image are turned by the same k*90 degrees, k uniform in {0, 1, 2, 3}. This is the authors'
  rule (models/ssl.py of RenkunNi/MetaContrastive: ``prob[i] <= p`` picks the image, ``np.random.randint(4)``
  draws k, so k = 0 is possible and 3p/4 of the images are turned); the rotated image stands in for the
  original, a new instance-class of the task, after the other augmentations.
* rotation prediction (``--rot_pred_weight``, in models/methods/base.py): every view gets its own k.

Draws come from a generator seeded by (seed, epoch, batch, rank) for each step: a resumed run draws what the
uninterrupted one drew, with no state in the checkpoint. Everything stays on the device: ``torch.rot90`` of
the whole batch for each k, kept where an image's k says (no host sync, no per-image loop).
"""
from __future__ import annotations

import torch


def step_generator(seed: int, epoch: int, batch: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one training step's rotations."""
    g = torch.Generator(device=device)
    g.manual_seed((((seed * 1_000_003 + epoch) * 1_000_033 + batch) * 257 + rank + 0x5EED) % (2**63 - 1))
    return g


def task_rotations(n: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """k of each of ``n`` images: with probability p uniform in {0, 1, 2, 3}, else 0 (int64, on ``device``)."""
    picked = torch.rand(n, generator=generator, device=device) < p
    k = torch.randint(0, 4, (n,), generator=generator, device=device)
    return torch.where(picked, k, torch.zeros_like(k))


def random_rotations(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """k uniform in {0, 1, 2, 3} for each of ``n`` images."""
    return torch.randint(0, 4, (n,), generator=generator, device=device)


def rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Images ``x`` (N, C, H, H) each turned counter-clockwise by ``k[i]`` * 90 degrees (square images)."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotations need square views, got {x.shape[-2]}x{x.shape[-1]}")
    out = x
    for r in (1, 2, 3):
        out = torch.where((k == r).view(-1, 1, 1, 1), torch.rot90(x, r, dims=(2, 3)), out)
    return out
