"""Batched per-sample SimCLR/BYOL augmentation on uint8 batches held on the training device.

The fast path of ``--faster_version``: instead of DataLoader workers augmenting one PIL image at a
time, a whole batch is augmented at once on the GPU (or CPU) with *per-sample* random parameters,
drawn fresh at every step from a seeded generator on the device (no host synchronisation):

* random resized crop with torchvision's sampling rule (10 tries of area ~ U(scale) and
  log-ratio ~ U(log 3/4, log 4/3), integer box, then the centre-crop fallback) and horizontal flip,
  both as one affine ``grid_sample`` per batch;
* colour jitter with brightness/contrast/saturation/hue factors as in torchvision, applied with p=0.8
  in a random order per sample (torchvision draws a new order per call), grayscale p=0.2;
* Gaussian blur with sigma ~ U(0.1, 2) and torchvision's kernel, as one grouped convolution;
* solarize (threshold 128 of 255) with BYOL's per-view probability.

FlatCLR's ``--faster_version`` drew one crop and one jitter per chunk of 128 images and reused the
views across epochs; here every image gets its own parameters at every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.augment import ViewSpec

GRAY = (0.2989, 0.587, 0.114)  # the luma weights of torchvision's rgb_to_grayscale
_CONSTANTS: dict = {}


def _const(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """A (1, C, 1, 1) constant on ``like``'s device, made once: a torch.tensor(list, device=cuda) per step
    would be a pageable host-to-device copy, which synchronises the stream."""
    key = (values, like.device, like.dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=like.dtype).view(1, -1, 1, 1).to(like.device)
    return _CONSTANTS[key]


@dataclass
class ViewParams:
    """Per-sample parameters of one view of a batch of B images (all tensors on the device)."""

    box: torch.Tensor  # (B, 4) crop top, left, height, width in pixels (integers as float)
    flip: torch.Tensor  # (B,) bool
    jitter: torch.Tensor  # (B,) bool, colour jitter applied
    factors: torch.Tensor  # (B, 4) brightness, contrast, saturation factors and hue shift
    order: torch.Tensor  # (B, 4) permutation of the four jitter operations
    gray: torch.Tensor  # (B,) bool
    blur: torch.Tensor  # (B,) bool
    sigma: torch.Tensor  # (B,)
    solarize: torch.Tensor  # (B,) bool


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def sample_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], g: torch.Generator, device,
                      ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for n images at once: (n, 4) top, left, h, w."""
    area = height * width
    target = area * (torch.rand(n, tries, generator=g, device=device) * (scale[1] - scale[0]) + scale[0])
    log_r = torch.rand(n, tries, generator=g, device=device) * (math.log(ratio[1]) - math.log(ratio[0])) \
        + math.log(ratio[0])
    aspect = log_r.exp()
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, tries)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(n, dtype=torch.long, device=device))
    w = w.gather(1, first[:, None])[:, 0]
    h = h.gather(1, first[:, None])[:, 0]
    # fallback when no try fits: the whole image, cropped to the nearest allowed aspect ratio
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    found = ok.any(1)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    # integer offsets uniform on [0, H - h] and [0, W - w] (torch.randint's rule, drawn per sample)
    top = torch.floor(torch.rand(n, generator=g, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(n, generator=g, device=device) * (width - w + 1))
    top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
    return torch.stack([top, left, h, w], dim=1)


class BatchedViews:
    """Draws and applies one view's augmentation to a uint8 batch; returns normalised float32."""

    def __init__(self, size: int, spec: ViewSpec, jitter_strength: float, min_scale: float, mean, std) -> None:
        self.size, self.spec, self.s, self.min_scale = size, spec, jitter_strength, min_scale
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(v) for v in std)
        self.kernel = max(3, int(0.1 * size) // 2 * 2 + 1)

    def sample(self, n: int, height: int, width: int, g: torch.Generator, device) -> ViewParams:
        s = self.s
        rand = lambda: torch.rand(n, generator=g, device=device)  # noqa: E731
        factors = torch.stack([_uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, g, device),
                               _uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, g, device),
                               _uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, g, device),
                               _uniform(n, -0.2 * s, 0.2 * s, g, device)], dim=1)
        return ViewParams(
            box=sample_crop_boxes(n, height, width, (self.min_scale, 1.0), g, device),
            flip=rand() < 0.5,
            jitter=rand() < 0.8,
            factors=factors,
            order=torch.rand(n, 4, generator=g, device=device).argsort(dim=1),
            gray=rand() < 0.2,
            blur=rand() < self.spec.blur_p,
            sigma=_uniform(n, 0.1, 2.0, g, device),
            solarize=rand() < self.spec.solarize_p,
        )

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, height, width = images.shape
        return self.apply(images, self.sample(n, height, width, g, images.device))

    def apply(self, images: torch.Tensor, p: ViewParams) -> torch.Tensor:
        x = crop_flip(images, p.box, p.flip, self.size)  # float in [0, 1]
        x = color_jitter(x, p.factors, p.order, p.jitter)
        x = torch.where(p.gray[:, None, None, None], grayscale(x).expand_as(x), x)
        if self.spec.blur_p > 0:
            x = gaussian_blur(x, p.sigma, p.blur, self.kernel)
        if self.spec.solarize_p > 0:
            # threshold 0.5: between 127 and 128 on uint8, so equal to torchvision's 128, and robust to
            # the last-bit rounding of the resampling
            x = torch.where(p.solarize[:, None, None, None] & (x >= 0.5), 1.0 - x, x)
        return (x - _const(self.mean, x)) / _const(self.std, x)


def crop_flip(images: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box, resize to size x size and flip, in one bilinear grid_sample.

    Sampling positions follow torchvision's resize (half-pixel centres, clamped to the crop), so the
    result equals ``resized_crop(..., antialias=False)``; crops are never larger than the image, so with
    the output at the image's size this only ever upsamples and antialiasing would not apply.
    """
    n, _, height, width = images.shape
    top, left, h, w = (v[:, None] for v in box.unbind(1))
    o = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5)[None, :] / size  # (1, size)
    xs = torch.minimum(torch.maximum(left + o * w - 0.5, left), left + w - 1)  # (n, size) pixel coords
    ys = torch.minimum(torch.maximum(top + o * h - 0.5, top), top + h - 1)
    xs = torch.where(flip[:, None], xs.flip(1), xs)
    gx = (2 * xs + 1) / width - 1  # align_corners=False normalisation
    gy = (2 * ys + 1) / height - 1
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=-1)
    x = images.float().div_(255)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return (x * _const(GRAY, x)).sum(dim=1, keepdim=True)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each image by ``shift`` (fraction of a turn); exact, vectorised.

    RGB -> hue from the channel that holds the maximum; back with the closed form
    ``rgb = v - d * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6h) mod 6`` for n = 5, 3, 1, where
    d = max - min (= v * s), so saturation and value are kept as they are.
    """
    maxc, argmax = x.max(dim=1, keepdim=True)
    d = maxc - x.min(dim=1, keepdim=True).values
    # numerators (g - b, b - r, r - g) for a maximum in r, g, b respectively
    num = (x.roll(-1, dims=1) - x.roll(-2, dims=1)).gather(1, argmax)
    h6 = 2 * argmax + num / torch.where(d > 0, d, torch.ones_like(d))  # hue in sixths of a turn
    h6 = (h6 + 6 * shift.view(-1, 1, 1, 1)) % 6
    k = (_const((5.0, 3.0, 1.0), x) + h6) % 6
    return maxc - d * torch.minimum(k, 4 - k).clamp(0, 1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """torchvision ColorJitter per sample: brightness, contrast, saturation, hue in a per-sample order.

    Brightness, contrast and saturation are each ``clamp(a * y + (1 - a) * m)`` with m = 0, the image's
    mean luma, or the pixel's luma, so one blend per slot serves all three. Hue, the expensive one,
    runs once: each sample's permutation is split into the slots before its hue and those after.
    """
    n = x.shape[0]
    hue_slot = (order == 3).float().argmax(dim=1)  # (n,) position of hue in each permutation
    slots = torch.arange(4, device=x.device)

    def cheap_slots(y: torch.Tensor, active: torch.Tensor, slot_range: range) -> torch.Tensor:
        for k in slot_range:  # active: (n, 4) bool
            op = order[:, k]
            use = active[:, k] & (op != 3)
            a = torch.where(use, factors.gather(1, op.clamp(max=2)[:, None])[:, 0], torch.ones_like(factors[:, 0]))
            gray = grayscale(y)
            m = torch.where((op == 0).view(n, 1, 1, 1), torch.zeros_like(gray),
                            torch.where((op == 1).view(n, 1, 1, 1), gray.mean(dim=(2, 3), keepdim=True), gray))
            a = a.view(n, 1, 1, 1)
            y = (a * y + (1 - a) * m).clamp(0, 1)
        return y

    # nothing precedes slot 0 and nothing follows slot 3, so each side needs three slots
    y = cheap_slots(x, slots[None, :] < hue_slot[:, None], range(0, 3))
    y = _adjust_hue(y, factors[:, 3])
    y = cheap_slots(y, slots[None, :] > hue_slot[:, None], range(1, 4))
    return torch.where(apply[:, None, None, None], y, x)


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


class DeviceLoader:
    """The dataset as one uint8 tensor on the training device; yields ``(views, index)`` batches.

    Each epoch draws a seeded permutation (the same on every rank) and rank r takes every W-th
    position, so the union of the ranks' step-k batches is the one-process step-k batch. Augmentation
    randomness comes from a generator seeded by (seed, epoch, rank) on the device.
    """

    def __init__(self, images: torch.Tensor, views: list[BatchedViews], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.images, self.views = images, views
        self.local_bs = batch_size // world_size
        self.seed, self.rank, self.world = seed, rank, world_size
        self.epoch = 0
        self.per_rank = images.shape[0] // world_size
        self.device = images.device

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank // self.local_bs

    def __iter__(self):
        g = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.images.shape[0], generator=g)[self.rank::self.world][: self.per_rank]
        order = order.to(self.device)
        aug = torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + self.epoch) * 64 + self.rank)
        for k in range(len(self)):
            index = order[k * self.local_bs:(k + 1) * self.local_bs]
            batch = self.images.index_select(0, index)
            yield [view(batch, aug) for view in self.views], index
