"""engine/memory.py's activation estimate (meta device) against what autograd really saves on the CPU.

Real: the bytes of the storages autograd saves for a batch of 4 less those of a batch of 2, over 2 (the weights
it also saves cancel); with ``--bf16`` under CPU bf16 autocast. Prints a markdown table.

    python benchmarks/memory_estimate.py            # about 10 s
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.memory import activation_bytes  # noqa: E402
from models.backbones import build_backbone  # noqa: E402

CASES = [("resnet50", 224, False), ("resnet18", 224, False), ("resnet50", 96, False), ("resnet18", 32, True)]


def saved_bytes(net: torch.nn.Module, size: int, batch: int, bf16: bool) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        net(torch.randn(batch, 3, size, size))
    return sum(storages.values())


def main() -> None:
    rows = ["| backbone | px | stem | estimate MB/image (fp32) | autograd fp32 | autograd bf16 | bf16/fp32 |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for arch, size, cifar in CASES:
        with torch.device("meta"):
            meta = build_backbone(arch, cifar)[0]
        real = build_backbone(arch, cifar)[0].train()
        fp32, bf16 = ((saved_bytes(real, size, 4, b) - saved_bytes(real, size, 2, b)) / 2 for b in (False, True))
        stem = "CIFAR" if cifar else "ImageNet"
        rows.append(f"| {arch} | {size} | {stem} | {activation_bytes(meta, size) / 1e6:.1f} | {fp32 / 1e6:.1f} "
                    f"| {bf16 / 1e6:.1f} | {bf16 / fp32:.2f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
