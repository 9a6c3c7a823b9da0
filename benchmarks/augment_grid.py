"""Writes a PNG grid of augmented views so a person can check them by eye.

Rows: the original images, then views from the standard (torchvision, per image) pipeline, then views
from the batched pipeline of ``--faster_version``; each pipeline shows two draws of each view.

    python benchmarks/augment_grid.py                                   # digits, SimCLR views
    python benchmarks/augment_grid.py --dataset_name folder --data ../shared/data/cifar10-subset --clr byol
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torchvision import tv_tensors  # noqa: E402

from data import load_split, view_transform  # noqa: E402
from data.augment import default_blur, default_jitter_strength  # noqa: E402
from data.batched_augment import BatchedViews  # noqa: E402
from data.loaders import resident_images  # noqa: E402
from models.methods import METHODS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_name", default="digits")
    p.add_argument("--data", default="./datasets")
    p.add_argument("--clr", default="simclr", choices=list(METHODS))
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/augment_grid.png",
                   help="the PNG to write (the committed benchmarks/augment_grid.png is written with --out)")
    args = p.parse_args()

    split = load_split(args.dataset_name, args.data, train=True)
    images = resident_images(split, args.dataset_name)[torch.randperm(len(split.dataset),
                                                       generator=torch.Generator().manual_seed(args.seed))[:args.images]]
    size = split.image_size
    strength = default_jitter_strength(size)
    specs = METHODS[args.clr].views(2, default_blur(size))
    mean = torch.tensor(split.mean).view(3, 1, 1)
    std = torch.tensor(split.std).view(3, 1, 1)

    def show(x: torch.Tensor) -> torch.Tensor:  # normalised -> [0, 1]
        return (x * std + mean).clamp(0, 1)

    rows = [[torch.nn.functional.interpolate(images.float()[i:i + 1] / 255, size=size)[0] for i in range(len(images))]]
    labels = ["original"]
    torch.manual_seed(args.seed)
    for v, spec in enumerate(specs):
        t = view_transform(size, spec, strength, 0.08, split.mean, split.std)
        for draw in range(2):
            rows.append([show(t(tv_tensors.Image(img))) for img in images])
            labels.append(f"standard view {v + 1}, draw {draw + 1}")
    g = torch.Generator().manual_seed(args.seed)
    for v, spec in enumerate(specs):
        batched = BatchedViews(size, spec, strength, 0.08, split.mean, split.std)
        for draw in range(2):
            rows.append(list(show(batched(images, g))))
            labels.append(f"batched view {v + 1}, draw {draw + 1}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(images), figsize=(1.2 * len(images) + 1.8, 1.2 * len(rows)))
    for r, (row, label) in enumerate(zip(rows, labels)):
        for c, img in enumerate(row):
            ax = axes[r, c]
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{args.clr} views on {args.dataset_name}: standard (per image) and batched (--faster_version)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
