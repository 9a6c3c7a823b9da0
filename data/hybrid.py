"""The hybrid input pipeline (``--input_pipeline hybrid``, and ``--decode_on_gpu``): DataLoader workers do only
what must happen per file, the training device does the rest in batches.

* Workers draw every parameter of an item's views from its own generator seeded by (seed, epoch, index), with
  the rules of ``data.batched_augment`` (torchvision's crop sampling, jitter factors and order, grayscale, blur
  sigma, solarize), then read and decode the file, take the random resized crop and the flip with PIL
  (antialiased bilinear, as torchvision's resize of a uint8 image) and return uint8 crops and the parameters:
  3 x 224 x 224 bytes a view instead of the standard pipeline's float32 (4x), and no colour work on the CPU.
* With ``--decode_on_gpu`` a worker only reads the file's bytes and its header (for the image size the crop
  needs); the main process decodes the batch with ``torchvision.io.decode_jpeg`` on the training device (on the
  CPU when there is no GPU) and crops there. A file that is not a JPEG is decoded by PIL in the worker; a JPEG
  the batched decoder refuses is tried alone, then with PIL; one nothing can read stops the run naming it, or
  with ``--skip_bad_images`` is replaced by the next readable image (the standard pipeline's rule).
* The main process moves the batch to the device and applies colour jitter, grayscale, blur, solarize and the
  normalisation (``BatchedViews.colour_crops``) with the workers' parameters.

Views are a function of (seed, epoch, index) whatever the number of workers or ranks, so a resumed run sees
the views of the uninterrupted one.
"""
from __future__ import annotations

import io
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from common.errors import BadImage, UserError
from data.batched_augment import BatchedViews, ViewParams
from data.datasets import read_image

JPEG_MAGIC = b"\xff\xd8\xff"
CROPPED, ENCODED = 0, 1  # what a worker returns for an item: its crops, or the file's bytes


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The item's private stream: the same whichever worker or rank loads it, and at every resume."""
    state = np.random.SeedSequence([seed, epoch, int(index)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def crop_pil(image, box: torch.Tensor, flip: bool, size: int) -> torch.Tensor:
    """The random resized crop of a PIL image (crop, then antialiased bilinear resize, then flip) as a uint8 CHW
    tensor. PIL's resize, where the standard pipeline resizes the uint8 tensor with torchvision
    (tests/test_hybrid.py compares the views of the two)."""
    from PIL import Image

    top, left, h, w = (int(v) for v in box.tolist())
    out = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def crop_tensor(image: torch.Tensor, box: torch.Tensor, flip: bool, size: int) -> torch.Tensor:
    """The same crop of a decoded (3, H, W) tensor on any device: float in [0, 1] (antialiased bilinear, as PIL)."""
    top, left, h, w = (int(v) for v in box.tolist())
    x = image[None, :, top:top + h, left:left + w].float().div_(255)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return x.flip(-1) if flip else x


class HybridItems(Dataset):
    """Worker side. ``dataset[(epoch, i)]`` -> (kind, crops (V, 3, S, S) uint8 or the file's bytes, params (V, 18),
    index). ``base`` is an ``(image, label)`` dataset; with ``encoded`` it must be an image folder (``samples``)."""

    def __init__(self, base: Dataset, views: list[BatchedViews], seed: int, encoded: bool = False,
                 skip_bad_images: bool = False, samples: list | None = None) -> None:
        self.base, self.views, self.seed, self.encoded, self.skip = base, views, seed, encoded, skip_bad_images
        self.size = views[0].size
        self.samples = samples if samples is not None else getattr(base, "samples", None)  # (path, label) per item
        if encoded and self.samples is None:
            raise UserError("--decode_on_gpu decodes image files, and this dataset is held in memory; drop "
                            "--decode_on_gpu")
        self.warned = False

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def params(self, epoch: int, i: int, height: int, width: int) -> list[ViewParams]:
        g = item_generator(self.seed, epoch, i)
        return [view.sample(1, height, width, g, "cpu") for view in self.views]

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        if self.encoded:
            data = self._file_bytes(i)
            if data[:3] == JPEG_MAGIC:
                try:
                    width, height = _header_size(data)
                    p = self.params(epoch, i, height, width)
                    return ENCODED, data, _packed(p), i
                except HEADER_ERRORS:
                    pass  # a header PIL cannot parse: decode_jpeg could not either; read_image below names it
        crops, p = self.cropped(epoch, i)
        return CROPPED, crops, _packed(p), i

    def cropped(self, epoch: int, i: int, image=None) -> tuple[torch.Tensor, list[ViewParams]]:
        """Item ``i``'s crops made here (its image decoded by PIL unless given), with the parameters drawn for it."""
        if image is None:
            image = self._image(i)
        if isinstance(image, torch.Tensor):  # an in-memory dataset's uint8 (3, H, W)
            from PIL import Image

            image = Image.fromarray(image.permute(1, 2, 0).numpy())
        p = self.params(epoch, i, image.height, image.width)
        return torch.stack([crop_pil(image, q.box[0], bool(q.flip[0]), self.size) for q in p]), p

    def _image(self, i: int):
        if self.encoded:  # SkipBadImages' rule, over the paths this class reads itself
            return self.readable(i, lambda j: read_image(self.samples[j][0]))
        return self.base[i][0]

    def _file_bytes(self, i: int) -> bytes:
        def read(j: int) -> bytes:
            path = self.samples[j][0]
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as err:
                raise BadImage(f"cannot read image {path} ({err.strerror}); replace or remove it, or pass "
                               "--skip_bad_images") from err

        return self.readable(i, read)

    def readable(self, i: int, read):
        """``read(i)``, or with --skip_bad_images that of the next readable item (one warning per process)."""
        n = len(self)
        for j in range(n if self.skip else 1):
            try:
                return read((i + j) % n)
            except BadImage as err:
                if not self.skip:
                    raise
                if not self.warned:
                    self.warned = True
                    print(f"warning: skipping unreadable images ({err}); each is replaced by the next readable one",
                          file=sys.stderr)
        raise UserError("no image of the dataset can be read")


def _header_errors() -> tuple:
    from PIL import Image

    return OSError, ValueError, SyntaxError, Image.DecompressionBombError  # read_image's


HEADER_ERRORS = _header_errors()


def _header_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:  # reads the header only
        return img.size


def _packed(params: list[ViewParams]) -> torch.Tensor:
    return torch.cat([p.pack() for p in params])  # (V, 18)


def collate(items: list) -> dict:
    """A batch of HybridItems' items: the crops (V, B, 3, S, S) (zeros where the item is encoded), the encoded files
    as one byte buffer and their end offsets (one tensor a batch: a tensor per file would hold a file descriptor
    per file between a worker and the main process, past the usual limit of 1,024 at ImageNet batch sizes), the
    parameters (V, B, 18) and the indices."""
    kinds = torch.tensor([kind for kind, *_ in items])
    params = torch.stack([p for _, _, p, _ in items], dim=1)
    index = torch.tensor([i for *_, i in items])
    cropped = [x for kind, x, _, _ in items if kind == CROPPED]
    crops = None
    if cropped:
        v, c, s, _ = cropped[0].shape
        crops = torch.zeros((v, len(items), c, s, s), dtype=torch.uint8)
        crops[:, kinds == CROPPED] = torch.stack(cropped, dim=1)
    files = [x for kind, x, _, _ in items if kind == ENCODED]
    return {"kind": kinds, "crops": crops, "files": torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8)
            if files else None, "ends": torch.tensor([len(f) for f in files]).cumsum(0), "params": params,
            "index": index}


class HybridLoader:
    """Main-process side: iterates the workers' batches and finishes the views on ``device``; yields
    ``(list of views, dataset indices)`` like the other loaders."""

    def __init__(self, loader, items: HybridItems, device: torch.device) -> None:
        self.loader, self.items, self.device = loader, items, device
        self.views = items.views

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield self.finish(batch)

    def finish(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        dev = self.device
        params = batch["params"].to(dev, non_blocking=True)
        index = batch["index"]
        if batch["crops"] is not None:
            crops = batch["crops"].to(dev, non_blocking=True).float().div_(255)  # (V, B, 3, S, S)
        else:
            crops = torch.empty((len(self.views), len(index), 3, self.items.size, self.items.size), device=dev)
        if batch["files"] is not None:
            self._decode_into(crops, batch)
        views = [view.colour_crops(crops[v], ViewParams.unpack(params[v])) for v, view in enumerate(self.views)]
        return views, index.to(dev, non_blocking=True)

    def _decode_into(self, crops: torch.Tensor, batch: dict) -> None:
        """Decodes the batch's JPEGs on the device and writes their crops into ``crops``."""
        rows = (batch["kind"] == ENCODED).nonzero()[:, 0].tolist()
        ends = batch["ends"].tolist()
        files = [batch["files"][start:end] for start, end in zip([0] + ends[:-1], ends)]
        images = self._decode(files, [int(batch["index"][r]) for r in rows])
        params = batch["params"]  # on the host: the boxes are read per image
        for r, (decoded, image) in zip(rows, images):
            if decoded:
                for v in range(len(self.views)):
                    box, flip = params[v, r, 0:4], bool(params[v, r, 4] > 0.5)
                    crops[v, r] = crop_tensor(image, box, flip, self.items.size)
            else:  # read by PIL (or replaced): its crops (V, 3, S, S), made with its own parameters
                crops[:, r] = image.to(crops.device).float().div_(255)

    def _decode(self, files: list[torch.Tensor], indices: list[int]) -> list[tuple[bool, torch.Tensor]]:
        """(True, the decoded (3, H, W) image), or (False, the item's crops) where only PIL could read it."""
        from torchvision.io import ImageReadMode, decode_jpeg

        device = self.device if self.device.type == "cuda" else "cpu"
        try:
            return [(True, image) for image in decode_jpeg(files, mode=ImageReadMode.RGB, device=device)]
        except RuntimeError:
            pass
        out = []  # some file the batched decoder refuses: each alone, then PIL, then the bad-image rule
        for data, i in zip(files, indices):
            try:
                out.append((True, decode_jpeg(data, mode=ImageReadMode.RGB, device=device)))
            except RuntimeError:
                out.append((False, self._fallback(i)))
        return out

    def _fallback(self, i: int) -> torch.Tensor:
        """Item ``i``'s crops (V, 3, S, S) uint8 from PIL, or those of the next readable item (skip rule).
        The epoch is the sampler's current one: its batches are the ones being finished."""
        epoch = self.loader.sampler.epoch
        crops, _ = self.items.cropped(epoch, i)
        return crops
