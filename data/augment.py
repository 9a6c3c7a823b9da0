"""SimCLR and BYOL view augmentations (torchvision.transforms.v2), run in DataLoader workers.

SimCLR (Chen et al. 2020, appendix A): random resized crop (scale 0.08-1), horizontal flip, colour
jitter (0.8s, 0.8s, 0.8s, 0.2s) with p=0.8, grayscale p=0.2, Gaussian blur p=0.5 with sigma 0.1-2
and a kernel of 10% of the image side (only for images of 96 px or more: the paper drops blur on
CIFAR). A method's own recipe (BYOL's asymmetric pair) lives with the method, as a list of ViewSpec.

Views are a pure function of (seed, epoch, dataset index, view): each item re-seeds a private RNG
scope, so the same run gives the same views whatever the number of workers or ranks, a resumed run
sees what the uninterrupted one saw, and every epoch still draws fresh views.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2


@dataclass(frozen=True)
class ViewSpec:
    blur_p: float
    solarize_p: float


def default_blur(size: int) -> bool:
    """SimCLR blurs ImageNet-sized views and drops blur on CIFAR (appendix B.9)."""
    return size >= 96


def default_jitter_strength(size: int) -> float:
    """SimCLR's colour strength: 0.5 on CIFAR-sized images, 1.0 on ImageNet."""
    return 0.5 if size <= 64 else 1.0


def symmetric_views(n_views: int, blur: bool) -> list[ViewSpec]:
    """SimCLR's recipe, the default of every method: each view blurred with p=0.5 (when blur is on)."""
    return [ViewSpec(0.5 if blur else 0.0, 0.0)] * n_views


def view_transform(size: int, spec: ViewSpec, jitter_strength: float, min_scale: float,
                   mean, std, greyscale: bool = False) -> v2.Compose:
    """One view's pipeline: uint8 tensor or PIL image -> normalised float32 CHW tensor. ``greyscale`` (images
    whose three channels are equal, such as Fashion-MNIST): brightness and contrast jitter only, no grayscale;
    saturation, hue and grayscale do nothing to a grey image but cost time."""
    s = jitter_strength
    jitter = v2.ColorJitter(0.8 * s, 0.8 * s) if greyscale else v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
    ops: list = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([jitter], p=0.8),
        *([] if greyscale else [v2.RandomGrayscale(p=0.2)]),
    ]
    if spec.blur_p > 0:
        kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd, ~10% of the side
        ops.append(v2.RandomApply([SeparableBlur(kernel)], p=spec.blur_p))
    if spec.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=spec.solarize_p))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


class SeparableBlur(torch.nn.Module):
    """torchvision's GaussianBlur (its kernel, reflect padding, sigma ~ U(0.1, 2) drawn from the same stream in
    the same way, uint8 rounded back) as two 1-D passes: 2k multiply-adds a pixel instead of k^2. At 224 px
    (k = 23), one thread: 41.0 ms a call as torchvision's 2-D convolution, 9.4 ms as two passes."""

    def __init__(self, kernel: int, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        super().__init__()
        self.kernel, self.sigma = kernel, sigma

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1])
        x = image.as_subclass(torch.Tensor)
        y = gaussian_blur(x[None].float(), sigma, torch.ones(1, dtype=torch.bool), self.kernel)[0]
        if not x.is_floating_point():
            y = y.round_().clamp_(0, 255).to(x.dtype)
        return tv_tensors.Image(y)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (reflect padding, as torchvision)."""
    n, c, h, w = x.shape
    half = (kernel - 1) / 2
    t = torch.linspace(-half, half, kernel, device=x.device)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (n, kernel)
    identity = torch.zeros_like(k)
    identity[:, kernel // 2] = 1.0
    k = torch.where(apply[:, None], k, identity)
    weight = k.repeat_interleave(c, dim=0)  # (n*c, kernel)
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, weight.view(n * c, 1, 1, kernel), groups=n * c)
    y = F.conv2d(y, weight.view(n * c, 1, kernel, 1), groups=n * c)
    return y.view(n, c, h, w)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one item's views in one epoch: the same whichever worker or rank loads it, and at a resume."""
    state = np.random.SeedSequence([seed, epoch, int(index)]).generate_state(1, np.uint64)[0]
    return int(state) & 0x7FFF_FFFF_FFFF_FFFF


class MultiViewDataset(Dataset):
    """Wraps an ``(image, label)`` dataset into ``(list of views, dataset index)`` items."""

    def __init__(self, base: Dataset, transforms: list[v2.Compose], seed: int) -> None:
        self.base, self.transforms, self.seed = base, transforms, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]):
        """``dataset[i]`` uses the epoch last set; ``dataset[(epoch, i)]`` (from EpochSampler) carries its own,
        which is what lets DataLoader workers persist across epochs: their copy of the dataset never sees
        ``set_epoch`` calls made in the main process."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        image, _ = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, epoch, i))
            if isinstance(image, torch.Tensor):
                image = tv_tensors.Image(image)
            views = [t(image) for t in self.transforms]
        return views, i


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` from a sampler with ``set_epoch``, for MultiViewDataset: the indices travel
    from the main process to the workers, so persistent workers see each new epoch.

    ``set_epoch(epoch, start_batch=k)`` starts the epoch at its k-th batch of ``batch_size`` indices (a resume
    from a mid-epoch checkpoint): the same order, the first k batches skipped without being loaded. The views
    need no saved state: they are a function of (seed, epoch, index).
    """

    def __init__(self, sampler, batch_size: int = 1) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0, state: dict | None = None) -> None:
        self.epoch, self.skip = epoch, start_batch * self.batch_size
        self.sampler.set_epoch(epoch)

    def state(self) -> dict:
        """What a mid-epoch checkpoint needs beyond the position: nothing."""
        return {}

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)

    def __iter__(self):
        return ((self.epoch, i) for i in itertools.islice(iter(self.sampler), self.skip, None))
