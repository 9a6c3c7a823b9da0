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
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from data.augment import ViewSpec, gaussian_blur

GRAY = (0.2989, 0.587, 0.114)  # the luma weights of torchvision's rgb_to_grayscale
# On the CPU a batch is augmented in chunks of about this many values per float tensor (1.5 MB), so that
# the intermediates stay in the core's cache: at 32x32, 128 images. Measured on the project's CPU machine,
# one thread, two SimCLR views: 256 images at once 8,669 img/s, in chunks of 64 or 128 about 9,250.
CPU_CHUNK_VALUES = 128 * 3 * 32 * 32
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

    def __getitem__(self, rows: slice) -> "ViewParams":
        return ViewParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def pack(self) -> torch.Tensor:
        """(B, 18) float32: what a DataLoader worker sends with its uint8 crop (the hybrid pipeline)."""
        return torch.cat([self.box, self.flip[:, None], self.jitter[:, None], self.factors, self.order,
                          self.gray[:, None], self.blur[:, None], self.sigma[:, None], self.solarize[:, None]],
                         dim=1).float()

    @staticmethod
    def unpack(t: torch.Tensor) -> "ViewParams":
        flag = lambda j: t[:, j] > 0.5  # noqa: E731
        return ViewParams(box=t[:, 0:4], flip=flag(4), jitter=flag(5), factors=t[:, 6:10], order=t[:, 10:14].long(),
                          gray=flag(14), blur=flag(15), sigma=t[:, 16], solarize=flag(17))


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

    def __init__(self, size: int, spec: ViewSpec, jitter_strength: float, min_scale: float, mean, std,
                 greyscale: bool = False) -> None:
        """``greyscale``: images whose channels are equal get brightness and contrast jitter only and no grayscale
        (the same draws are made, so the crops are those of a colour set; saturation 1, hue 0, grayscale off)."""
        self.size, self.spec, self.s, self.min_scale = size, spec, jitter_strength, min_scale
        self.greyscale = greyscale
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(v) for v in std)
        self.kernel = max(3, int(0.1 * size) // 2 * 2 + 1)

    def sample(self, n: int, height: int, width: int, g: torch.Generator, device) -> ViewParams:
        s = self.s
        rand = lambda: torch.rand(n, generator=g, device=device)  # noqa: E731
        factors = torch.stack([_uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, g, device),
                               _uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, g, device),
                               _uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, g, device),
                               _uniform(n, -0.2 * s, 0.2 * s, g, device)], dim=1)
        gray = rand() < 0.2
        if self.greyscale:
            factors[:, 2], factors[:, 3] = 1.0, 0.0
            gray = torch.zeros_like(gray)
        return ViewParams(
            box=sample_crop_boxes(n, height, width, (self.min_scale, 1.0), g, device),
            flip=rand() < 0.5,
            jitter=rand() < 0.8,
            factors=factors,
            order=torch.rand(n, 4, generator=g, device=device).argsort(dim=1),
            gray=gray,
            blur=rand() < self.spec.blur_p,
            sigma=_uniform(n, 0.1, 2.0, g, device),
            solarize=rand() < self.spec.solarize_p,
        )

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, c, height, width = images.shape
        p = self.sample(n, height, width, g, images.device)
        return self._chunked(self.apply, images, p)

    def colour_crops(self, crops: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """The rest of the view for crops already taken (float in [0, 1], at ``size``): the device half of the
        hybrid pipeline, whose workers cropped and flipped with the parameters ``p``."""
        return self._chunked(self.colour, crops, p)

    def _chunked(self, fn, images: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """``fn(images, p)`` in pieces on the CPU: the same parameters, so the same views as in one piece,
        only faster."""
        n, c, height, width = images.shape
        chunk = max(1, CPU_CHUNK_VALUES // (c * max(height * width, self.size ** 2)))
        if images.device.type != "cpu" or n <= chunk:
            return fn(images, p)
        return torch.cat([fn(images[i:i + chunk], p[i:i + chunk]) for i in range(0, n, chunk)])

    def apply(self, images: torch.Tensor, p: ViewParams) -> torch.Tensor:
        return self.colour(crop_flip(images, p.box, p.flip, self.size), p)

    def colour(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """Jitter, grayscale, blur, solarize and normalisation of crops ``x`` (float in [0, 1])."""
        x = color_jitter(x, p.factors, p.order, p.jitter, hue=not self.greyscale)
        n, c, height, width = x.shape
        _, _, eye, luma = _slot_tables(x.device)
        mats = eye + p.gray.to(x.dtype).view(n, 1, 1) * (luma.expand(3, 3) - eye)  # grayscale or identity
        mean, std = _const(self.mean, x).view(1, 3, 1), _const(self.std, x).view(1, 3, 1)
        if self.spec.blur_p == 0 and self.spec.solarize_p == 0:  # grayscale and normalisation in one matmul
            return torch.baddbmm(-mean / std, mats / std, x.view(n, c, -1)).view(n, c, height, width)
        x = torch.bmm(mats, x.view(n, c, -1)).view(n, c, height, width)
        if self.spec.blur_p > 0:
            x = gaussian_blur(x, p.sigma, p.blur, self.kernel)
        if self.spec.solarize_p > 0:
            # threshold 0.5: between 127 and 128 on uint8, so equal to torchvision's 128, and robust to
            # the last-bit rounding of the resampling; x + m * (1 - 2x) is 1 - x where m = 1
            m = (x >= 0.5).logical_and_(p.solarize.view(n, 1, 1, 1)).to(x.dtype)
            x = x.addcmul_(m, 1 - 2 * x)
        return x.view(n, c, -1).sub_(mean).div_(std).view(n, c, height, width)


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


def _slot_tables(device) -> tuple[torch.Tensor, ...]:
    """Constants of color_jitter, made once per device: the permutation position each of the six blend
    slots reads, whether the slot runs before the hue, the identity and the luma row."""
    key = ("jitter", device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = (torch.tensor([0, 1, 2, 1, 2, 3], device=device),
                           torch.tensor([True, True, True, False, False, False], device=device),
                           torch.eye(3, device=device), torch.tensor(GRAY, device=device))
    return _CONSTANTS[key]


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each image of ``x`` (n, 3, P) by ``shift`` (n,) turns; exact, as torchvision.

    The hue in sixths of a turn comes from the channel holding the maximum (r, g, b priority on ties).
    Going back, a channel whose centre (r 0, g 2, b 4) lies within 1 of the new hue is at the maximum,
    one beyond 2 at the minimum and linear in between, so value and saturation stay as they were:
    ``channel = max - d * clamp(dist - 1, 0, 1)``, d = max - min, dist the circular distance in [0, 3].
    Written as in-place passes over whole planes: per-element selects (torch.where) and remainders
    are several times slower than arithmetic on the CPU.
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    d = maxc - x.amin(1)
    in_r = (r == maxc).to(x.dtype)
    in_g = (g == maxc).to(x.dtype).mul_(1 - in_r)
    in_b = (1 - in_r).sub_(in_g)
    # d * hue in sixths: (g - b), 2d + (b - r) or 4d + (r - g) for a maximum in r, g or b
    h6 = (g - b).mul_(in_r).addcmul_((b - r).add_(d, alpha=2), in_g).addcmul_((r - g).add_(d, alpha=4), in_b)
    h6 = h6.div_(d.clamp_min(1e-12)).add_(6 * shift[:, None])  # where d = 0 every numerator is 0
    h6 = h6.sub_(torch.floor(h6 / 6).mul_(6))  # [0, 6)
    dist = (h6[:, None, :] - _const((0.0, 2.0, 4.0), x).view(1, 3, 1)).abs_()  # [0, 6)
    minus_f = dist.sub_(3).abs_().sub_(2).clamp_(-1, 0)  # 3 - |dist - 3| is the circular distance
    return minus_f.mul_(d[:, None]).add_(maxc[:, None])


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor,
                 hue: bool = True) -> torch.Tensor:
    """torchvision ColorJitter per sample: brightness, contrast, saturation, hue in a per-sample order.

    Brightness, contrast and saturation are each ``clamp(a * y + (1 - a) * m)`` with m = 0, the image's
    mean luma, or the pixel's luma: a 3x3 colour matrix plus a per-image offset, so each slot is one
    batched matmul (``baddbmm``) whatever op each sample has there. Hue, the expensive one, runs once:
    each sample's permutation is split into the slots before its hue (0-2) and those after (1-3), the
    slots it does not use being the identity. Samples with ``apply`` False come back unchanged. ``hue`` False
    skips the hue pass (grey images, whose hue shift is 0).
    """
    n, c, height, width = x.shape
    slot_pos, before_hue, eye, luma = _slot_tables(x.device)
    hue_pos = (order == 3).to(x.dtype).argmax(dim=1)[:, None]
    ops = order[:, slot_pos]  # (n, 6): the op each sample has in each slot
    active = torch.where(before_hue, slot_pos < hue_pos, slot_pos > hue_pos) & (ops != 3) & apply[:, None]
    a = torch.where(active, factors.gather(1, ops.clamp(max=2)), torch.ones_like(factors[:, :1]))
    mats = a[..., None, None] * eye + ((1 - a) * (active & (ops == 2)))[..., None, None] * luma.expand(3, 3)
    contrast = (1 - a) * (active & (ops == 1))  # weight of the mean luma, (n, 6)
    flat = x.reshape(n, c, height * width)
    y = flat
    for s in range(6):
        if s == 3 and hue:
            y = _adjust_hue(y, factors[:, 3] * apply)
        offset = (contrast[:, s] * (y.mean(2) @ luma)).view(n, 1, 1)
        y = torch.baddbmm(offset, mats[:, s], y).clamp_(0, 1)
    # x + 0 * (y - x) is x exactly, where the matrices' identity and a zero hue shift are only close to it
    return y.sub_(flat).mul_(apply.to(x.dtype).view(n, 1, 1)).add_(flat).view(n, c, height, width)


class DeviceLoader:
    """The dataset as one uint8 tensor on the training device; yields ``(views, index)`` batches.

    Each epoch draws a seeded permutation (the same on every rank) and rank r takes every W-th
    position, so the union of the ranks' step-k batches is the one-process step-k batch. Augmentation
    randomness comes from a generator seeded by (seed, epoch, rank) on the device. A mid-epoch checkpoint
    holds that generator's state (``state()``); ``set_epoch(epoch, start_batch, state)`` continues from it.
    """

    def __init__(self, images: torch.Tensor, views: list[BatchedViews], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.images, self.views = images, views
        self.local_bs = batch_size // world_size
        self.seed, self.rank, self.world = seed, rank, world_size
        self.epoch, self.start_batch, self._resume_state = 0, 0, None
        self._aug: torch.Generator | None = None
        self.per_rank = images.shape[0] // world_size
        self.device = images.device

    def set_epoch(self, epoch: int, start_batch: int = 0, state: dict | None = None) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        self._resume_state = (state or {}).get("aug") if start_batch else None  # a fresh epoch: a fresh seed
        if start_batch and self._resume_state is None:
            raise ValueError("resuming inside an epoch needs the augmentation generator's state")

    def state(self) -> dict:
        """The augmentation generator's state after the batches yielded so far (a CPU byte tensor)."""
        return {} if self._aug is None else {"aug": self._aug.get_state()}

    def __len__(self) -> int:
        return self.per_rank // self.local_bs

    def __iter__(self):
        g = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.images.shape[0], generator=g)[self.rank::self.world][: self.per_rank]
        if self.device.type == "cuda":  # pinned and asynchronous: a pageable copy would drain the stream
            order = order.pin_memory().to(self.device, non_blocking=True)
        aug = torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + self.epoch) * 64 + self.rank)
        if self._resume_state is not None:
            aug.set_state(self._resume_state)
        self._aug = aug
        for k in range(self.start_batch, len(self)):
            index = order[k * self.local_bs:(k + 1) * self.local_bs]
            batch = self.images.index_select(0, index)
            yield [view(batch, aug) for view in self.views], index
