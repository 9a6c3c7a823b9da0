"""Where a number came from: the command, the code (git commit, and whether the checkout had changes), the
library versions and the hardware. Written into every run's config.yaml and checkpoints and every evaluation's
json record, so a figure in a table can be traced to what made it."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND: list[str] = []  # main.py's arguments, set by main() (sys.argv is a test runner's under pytest)


@functools.lru_cache(maxsize=1)
def _git() -> dict:
    """The checkout's commit and whether tracked files differ from it; nothing outside a git checkout."""
    def run(*args: str) -> str:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": dirty}


def provenance(device: torch.device, world_size: int) -> dict:
    import torchvision

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.machine()}, {os.cpu_count()} cores")
    return {"command": " ".join(["main.py", *COMMAND]) if COMMAND else " ".join(sys.argv), **_git(),
            "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version(),
            "device": f"{device.type}: {name}", "world_size": world_size, "host": platform.node()}
