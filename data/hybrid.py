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

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from common.errors import BadImage, UserError
from data.augment import item_seed
from data.batched_augment import BatchedViews, ViewParams
from data.datasets import first_readable, image_errors, image_files, read_image

JPEG_MAGIC = b"\xff\xd8\xff"
CROPPED, ENCODED = 0, 1  # what a worker returns for an item: its crops, or the file's bytes


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
    index, epoch). ``base`` is an ``(image, label)`` dataset; with ``encoded`` it must be an image folder."""

    def __init__(self, base: Dataset, views: list[BatchedViews], seed: int, encoded: bool = False,
                 skip_bad_images: bool = False) -> None:
        self.base, self.views, self.seed, self.encoded, self.skip = base, views, seed, encoded, skip_bad_images
        self.size = views[0].size
        self.samples = image_files(base)  # (path, label) per item; None in memory
        if encoded and self.samples is None:
            raise UserError("--decode_on_gpu decodes image files, and this dataset is held in memory; drop "
                            "--decode_on_gpu")
        self.warned = False

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def params(self, epoch: int, i: int, height: int, width: int) -> list[ViewParams]:
        g = torch.Generator().manual_seed(item_seed(self.seed, epoch, i))
        return [view.sample(1, height, width, g, "cpu") for view in self.views]

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        if self.encoded:
            data = self._file_bytes(i)
            size = _jpeg_size(data)  # None: not a JPEG, or a header PIL cannot parse (read_image names the file)
            if size is not None:
                return ENCODED, data, _packed(self.params(epoch, i, size[1], size[0])), i, epoch
        crops, p = self.cropped(epoch, i)
        return CROPPED, crops, _packed(p), i, epoch

    def cropped(self, epoch: int, i: int) -> tuple[torch.Tensor, list[ViewParams]]:
        """Item ``i``'s crops made here (its image decoded by PIL), with the parameters drawn for it."""
        image = self._image(i)
        if isinstance(image, torch.Tensor):  # an in-memory dataset's uint8 (3, H, W)
            from PIL import Image

            image = Image.fromarray(image.permute(1, 2, 0).numpy())
        p = self.params(epoch, i, image.height, image.width)
        return torch.stack([crop_pil(image, q.box[0], bool(q.flip[0]), self.size) for q in p]), p

    def _image(self, i: int):
        if self.encoded:  # SkipBadImages' rule, over the paths this class reads itself
            return first_readable(lambda j: read_image(self.samples[j][0]), i, len(self), self, self.skip)
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

        return first_readable(read, i, len(self), self, self.skip)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's header (PIL reads only the header), or None."""
    from PIL import Image

    if data[:3] != JPEG_MAGIC:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except image_errors():
        return None


def _packed(params: list[ViewParams]) -> torch.Tensor:
    return torch.cat([p.pack() for p in params])  # (V, 18)


def collate(items: list) -> dict:
    """A batch of HybridItems' items: the crops (V, B, 3, S, S) (the rows of encoded items are left for the main
    process to fill), the encoded files as one byte buffer and their end offsets (one tensor a batch: a tensor
    per file would hold a file descriptor per file between a worker and the main process, past the usual limit
    of 1,024 at ImageNet batch sizes), the parameters (V, B, 18), the indices and the epoch."""
    kinds = torch.tensor([kind for kind, *_ in items])
    params = torch.stack([p for _, _, p, _, _ in items], dim=1)
    index = torch.tensor([i for _, _, _, i, _ in items])
    cropped = [(r, x) for r, (kind, x, *_) in enumerate(items) if kind == CROPPED]
    crops = None
    if cropped:
        crops = torch.empty((cropped[0][1].shape[0], len(items), *cropped[0][1].shape[1:]), dtype=torch.uint8)
        for r, x in cropped:  # written in place: one copy of each crop
            crops[:, r] = x
    files = [x for kind, x, *_ in items if kind == ENCODED]
    return {"kind": kinds, "crops": crops, "files": torch.frombuffer(bytearray().join(files), dtype=torch.uint8)
            if files else None, "ends": torch.tensor([len(f) for f in files]).cumsum(0), "params": params,
            "index": index, "epoch": items[0][4]}


class HybridLoader:
    """Main-process side: iterates the workers' batches (``loader``, a DataLoader over ``items`` with
    :func:`collate`) and finishes the views on ``device``; yields ``(list of views, dataset indices)`` like the
    other loaders. ``finish`` alone needs no loader (tests, benchmarks)."""

    def __init__(self, loader, items: HybridItems, device: torch.device) -> None:
        self.loader, self.items, self.device = loader, items, device

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
            crops = torch.empty((len(self.items.views), len(index), 3, self.items.size, self.items.size), device=dev)
        if batch["files"] is not None:
            self._decode_into(crops, batch)
        views = [view.colour_crops(crops[v], ViewParams.unpack(params[v])) for v, view in enumerate(self.items.views)]
        return views, index.to(dev, non_blocking=True)

    def _decode_into(self, crops: torch.Tensor, batch: dict) -> None:
        """Decodes the batch's JPEGs on the device and writes their crops into ``crops``."""
        rows = (batch["kind"] == ENCODED).nonzero()[:, 0].tolist()
        ends = batch["ends"].tolist()
        files = [batch["files"][start:end] for start, end in zip([0] + ends[:-1], ends)]
        images = self._decode(files, [int(batch["index"][r]) for r in rows], batch["epoch"])
        params = [ViewParams.unpack(p) for p in batch["params"]]  # on the host: the boxes are read per image
        for r, (decoded, image) in zip(rows, images):
            if decoded:
                for v, p in enumerate(params):
                    crops[v, r] = crop_tensor(image, p.box[r], bool(p.flip[r]), self.items.size)
            else:  # read by PIL (or replaced): its crops (V, 3, S, S), made with its own parameters
                crops[:, r] = image.to(crops.device).float().div_(255)

    def _decode(self, files: list[torch.Tensor], indices: list[int], epoch: int) -> list[tuple[bool, torch.Tensor]]:
        """(True, the decoded (3, H, W) image), or (False, the item's crops) where only PIL could read it."""
        device = self.device if self.device.type == "cuda" else "cpu"
        try:
            return [(True, image) for image in decode_jpeg(files, mode=ImageReadMode.RGB, device=device)]
        except RuntimeError:  # some file the batched decoder refuses: each alone, then PIL, then the bad-image rule
            return [self._decode_one(data, i, epoch, device) for data, i in zip(files, indices)]

    def _decode_one(self, data: torch.Tensor, i: int, epoch: int, device) -> tuple[bool, torch.Tensor]:
        try:
            return True, decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            return False, self.items.cropped(epoch, i)[0]  # PIL, or the next readable item (the skip rule)
