"""Disk use of a 1000-epoch ImageNet run per method under the default checkpoint retention.

For each ImageNet preset (configs/imagenet_*.yaml) the method is built on the CPU at ImageNet's size
(1,281,167 images: InsDis's memory bank), one optimizer step is taken so that the optimizer holds its state,
and the checkpoint is written by the tool's own code (``training_state`` + ``atomic_save``) and its size read
from the disk. The number of checkpoints a run keeps comes from the tool's own pruning (``prune_epoch_ends``)
applied after every save of a simulated 1000-epoch run with the preset's ``--save_every_n_epochs`` and the
default ``--keep_checkpoints`` / ``--milestone_every_n_epochs``; "before" is every checkpoint kept.

    python benchmarks/checkpoint_disk.py            # about a minute, ~3 GB of memory, writes to a temp dir
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine import checkpoint as ckpt_io  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from engine.rundir import milestone_every  # noqa: E402
from main import resolve  # noqa: E402
from models import build_method  # noqa: E402

IMAGENET_TRAIN = 1_281_167
EPOCHS = 1000


def checkpoint_bytes(cfg, directory: str) -> int:
    torch.manual_seed(0)
    method = build_method(cfg, num_data=IMAGENET_TRAIN, cifar_stem=False)
    opt = build_optimizer(cfg.optimizer, method, 0.1, cfg.weight_decay, cfg.momentum, cfg.wd_bias_and_norm)
    for p in method.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()  # the momentum (and Adam moments) now exist, as in every checkpoint after the first step
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = ckpt_io.training_state(epoch=1, step=1, method=method, optimizer=opt, scaler=scaler, schedule={},
                                   ranks=[(ckpt_io.rng_state(), {})] * 8, args=vars(cfg))
    path = os.path.join(directory, "checkpoint_0001.pth.tar")
    ckpt_io.atomic_save(state, path)
    size = os.path.getsize(path)
    ckpt_io.remove_checkpoint(path)
    return size


def kept(cfg, directory: str, epochs: int = EPOCHS) -> int:
    """Checkpoints left after a run of ``epochs`` epochs saving every --save_every_n_epochs, pruned as the run
    prunes (empty files standing for the checkpoints)."""
    run = os.path.join(directory, "run")
    os.makedirs(run)
    for epoch in range(cfg.save_every_n_epochs, epochs + 1, cfg.save_every_n_epochs):
        open(os.path.join(run, ckpt_io.checkpoint_name(epoch)), "w").close()
        ckpt_io.prune_epoch_ends(run, cfg.keep_checkpoints, milestone_every(cfg), epoch)
    n = len(ckpt_io.list_checkpoints(run))
    for name in os.listdir(run):
        os.remove(os.path.join(run, name))
    os.rmdir(run)
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="simclr,flatclr,byol,insdis")
    args = p.parse_args(argv)
    rows = ["| method (preset) | checkpoint | kept of a 1000-epoch run | disk | before (every one kept) |",
            "|---|---:|---:|---:|---:|"]
    for name in args.methods.split(","):
        cfg = resolve(["--config", f"configs/imagenet_{name}.yaml", "--data", "unused"])[0]
        with tempfile.TemporaryDirectory() as tmp:
            size = checkpoint_bytes(cfg, tmp)
            n = kept(cfg, tmp)
        every = EPOCHS // cfg.save_every_n_epochs
        preset = f"{cfg.clr} (imagenet_{name}.yaml, save every {cfg.save_every_n_epochs})"
        rows.append(f"| {preset} | {size / 2**20:,.0f} MiB | {n} | {n * size / 2**30:,.1f} GiB "
                    f"| {every} files, {every * size / 2**30:,.0f} GiB |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
