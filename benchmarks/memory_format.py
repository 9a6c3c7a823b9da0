"""Training-step time of a method with NCHW against channels_last (NHWC) weights and inputs.

Same model, optimizer and inputs; the formats alternate so that drift in the machine's speed hits both.

    python benchmarks/memory_format.py --batch_size 32 --rounds 2
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.throughput import timed  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from main import resolve  # noqa: E402
from models import build_method  # noqa: E402


def step_ms(cfg, channels_last: bool, batch: int, size: int, steps: int, device: torch.device) -> float:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    method = build_method(cfg, num_data=10_000, cifar_stem=size <= 64).to(device, memory_format=fmt)
    opt = build_optimizer(cfg.optimizer, method, 0.1, cfg.weight_decay, cfg.momentum)
    views = [torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt) for _ in range(2)]
    index = torch.arange(batch, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        loss, _, _ = method(views, index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, steps, sync) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clr", default="simclr")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg, _, _ = resolve([f"--clr={args.clr}", f"--arch={args.arch}", "--dataset_name=digits",
                         f"--batch_size={args.batch_size}", f"--device={device.type}"])
    print(f"# {args.clr} {args.arch}, batch {args.batch_size}, {args.image_size}px, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; ms per step, mean of {args.steps}\n")
    print("| round | NCHW | channels_last |\n|---|---|---|")
    for r in range(args.rounds):
        nchw = step_ms(cfg, False, args.batch_size, args.image_size, args.steps, device)
        nhwc = step_ms(cfg, True, args.batch_size, args.image_size, args.steps, device)
        print(f"| {r + 1} | {nchw:,.0f} | {nhwc:,.0f} |")


if __name__ == "__main__":
    main()
