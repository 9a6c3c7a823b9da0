"""Views per second per CPU core of the ImageNet input pipelines, on real JPEGs of ImageNet's typical size.

The JPEGs are scikit-learn's two bundled photos (427x640), cropped at random places and resized to about
500x375 (ImageNet's typical size), re-encoded at quality 90. One thread, no DataLoader (a worker's work on one
core), two SimCLR views at 224 px (crop scale 0.08-1, colour strength 1.0, blur p=0.5) per image:

* ``standard, 2-D blur``: the worker pipeline before the hybrid one (torchvision's GaussianBlur, 23x23 kernel);
* ``standard``: the same with the separable blur it uses now;
* ``hybrid worker``: what a worker does under ``--input_pipeline hybrid`` (decode, crop, flip, uint8 out);
* ``decode_on_gpu worker``: what a worker does under ``--decode_on_gpu`` (read the bytes and the header);
* ``hybrid device half on the CPU``: jitter, grayscale, blur and normalisation of the uint8 crops in batches of
  64, one thread: the cost the hybrid path moves to the training device, shown for CPU-only training;
* ``decode_on_gpu device half on the CPU``: decode_jpeg of a batch, the crops and the colour work, one thread.

With ``--device cuda`` it also times the device half on the GPU (decode_jpeg on the device, crops, colour work)
in images per second. Prints a markdown table; ``--out FILE`` writes it too.

    python benchmarks/input_pipeline.py                 # about a minute on one core
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from data.augment import MultiViewDataset, ViewSpec, view_transform  # noqa: E402
from data.batched_augment import BatchedViews  # noqa: E402
from data.datasets import IMAGENET_MEAN, IMAGENET_STD, load_split  # noqa: E402
from data.hybrid import HybridItems, HybridLoader, collate  # noqa: E402

SIZE, SPECS = 224, [ViewSpec(0.5, 0.0)] * 2


def imagenet_sized_folder(root: str, n: int, seed: int = 0) -> str:
    """``n`` JPEGs of about 500x375 (either orientation) under root/train/{a,b} (and a small test split)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("test", 2)):
        for c in "ab":
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
        for j in range(count):
            photo = photos[j % 2]
            h, w = int(rng.integers(200, 427)), int(rng.integers(260, 640))
            top, left = int(rng.integers(0, 427 - h + 1)), int(rng.integers(0, 640 - w + 1))
            out = (500, 375) if rng.random() < 0.75 else (375, 500)  # ImageNet: mostly landscape
            Image.fromarray(photo[top:top + h, left:left + w]).resize(out, Image.BICUBIC).save(
                os.path.join(root, split, "ab"[j % 2], f"{j:04d}.jpg"), quality=90)
    return root


def per_second(fn, items: int, min_seconds: float) -> float:
    fn(0)  # warm-up (imports, first allocations)
    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < min_seconds or done == 0:
        fn(done)
        done += 1
    return done * items / (time.perf_counter() - t)


def measure(folder: str, seconds: float, device: str) -> list[dict]:
    """The table's rows; the process's thread count is as it was afterwards."""
    threads = torch.get_num_threads()
    try:
        return _measure(folder, seconds, device)
    finally:
        torch.set_num_threads(threads)


def _measure(folder: str, seconds: float, device: str) -> list[dict]:
    torch.set_num_threads(1)
    split = load_split("folder", folder, train=True, image_size=SIZE)
    n = len(split.dataset)
    views = len(SPECS)
    batched = [BatchedViews(SIZE, s, 1.0, 0.08, IMAGENET_MEAN, IMAGENET_STD) for s in SPECS]
    old = [view_transform(SIZE, s, 1.0, 0.08, split.mean, split.std) for s in SPECS]
    for t in old:  # the 2-D blur the standard pipeline used before
        t.transforms = [v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5) if isinstance(op, v2.RandomApply)
                        and "Blur" in type(op.transforms[0]).__name__ else op for op in t.transforms]
    rows = []
    for name, transforms in (("standard, 2-D blur (before)", old),
                             ("standard (separable blur)", [view_transform(SIZE, s, 1.0, 0.08, split.mean, split.std)
                                                            for s in SPECS])):
        ds = MultiViewDataset(split.dataset, transforms, seed=0)
        rows.append({"path": name, "where": "worker", "views_s": per_second(lambda k: ds[(0, k % n)], views, seconds)})
    hybrid = HybridItems(split.dataset, batched, seed=0)
    encoded = HybridItems(split.dataset, batched, seed=0, encoded=True)
    rows.append({"path": "hybrid worker (decode, crop, flip)", "where": "worker",
                 "views_s": per_second(lambda k: hybrid[(0, k % n)], views, seconds)})
    rows.append({"path": "decode_on_gpu worker (bytes, header)", "where": "worker",
                 "views_s": per_second(lambda k: encoded[(0, k % n)], views, seconds)})
    batch = 64
    plain_batches = [collate([hybrid[(0, (b * batch + i) % n)] for i in range(batch)]) for b in range(2)]
    file_batches = [collate([encoded[(0, (b * batch + i) % n)] for i in range(batch)]) for b in range(2)]
    for label, batches, dev in (("hybrid device half", plain_batches, "cpu"),
                                ("decode_on_gpu device half", file_batches, "cpu")):
        loader = HybridLoader(None, hybrid if "hybrid" in label else encoded, torch.device(dev))
        rows.append({"path": f"{label} on the CPU (batches of {batch})", "where": "main process",
                     "views_s": per_second(lambda k: loader.finish(batches[k % 2]), views * batch, seconds)})
    if device == "cuda":
        torch.set_num_threads(os.cpu_count() or 1)
        for label, batches in (("hybrid device half", plain_batches), ("decode_on_gpu device half", file_batches)):
            loader = HybridLoader(None, hybrid if "hybrid" in label else encoded, torch.device("cuda"))

            def step(k, loader=loader, batches=batches):
                loader.finish(batches[k % 2])
                torch.cuda.synchronize()

            rows.append({"path": f"{label} on {torch.cuda.get_device_name()} (batches of {batch})",
                         "where": "GPU", "views_s": per_second(step, views * batch, seconds)})
    return rows


def table(rows: list[dict], base: float) -> str:
    lines = ["| path | where | views/s per core | x standard before |", "|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['where']} | {r['views_s']:.1f} | {r['views_s'] / base:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=48, help="JPEGs in the folder")
    p.add_argument("--seconds", type=float, default=4.0, help="time per measurement")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = imagenet_sized_folder(tmp, args.images)
        rows = measure(folder, args.seconds, args.device)
    text = table(rows, rows[0]["views_s"])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
