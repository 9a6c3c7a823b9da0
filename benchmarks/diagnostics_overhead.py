"""What the training diagnostics (losses/diagnostics.py, on logging steps) cost: the real training step with
and without them, alternating in rounds, and the overhead per step at --log_every_n_steps N.

    python benchmarks/diagnostics_overhead.py --device cpu --arch resnet18 --width 0.25 --batch 256
    python benchmarks/diagnostics_overhead.py --device cuda --batch 512        # bf16 on a GPU node
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.gpu_check import Bench, Check  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--clr", default="simclr")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--log_every", type=int, default=50, help="--log_every_n_steps to amortise over")
    args = p.parse_args()
    check = Check(argparse.Namespace(device=args.device, quick=False))
    bench = Bench(check, args.clr, args.arch, args.crop, args.batch, compiled=False,
                  extra=[f"--width_multiplier={args.width}"])
    for _ in range(2):  # warm-up, both paths
        bench.step()
        bench.step(diagnose=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for diagnose in (False, True):
            check.sync()
            t0 = time.perf_counter()
            bench.step(diagnose=diagnose)
            check.sync()
            times[diagnose].append(time.perf_counter() - t0)
    plain, diag = statistics.median(times[False]), statistics.median(times[True])
    extra = diag - plain
    print(f"device {torch.cuda.get_device_name() if check.cuda else f'cpu ({os.cpu_count()} cores)'}, "
          f"{args.clr} {args.arch} width {args.width} batch {args.batch} {check.precision}, torch {torch.__version__}")
    print(f"step without diagnostics {plain * 1e3:.1f} ms, with {diag * 1e3:.1f} ms (medians of {args.rounds}): "
          f"+{extra * 1e3:.1f} ms on a logging step, {extra / plain:.1%} of a step; at --log_every_n_steps "
          f"{args.log_every}: {extra / plain / args.log_every:.2%} of the training time")


if __name__ == "__main__":
    main()
