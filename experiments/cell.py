"""One sweep cell: ``python main.py ARGS`` in a process that ends when the sweep dies.

The sweep starts ``python -m experiments.cell ARGS``; on Linux the cell asks the kernel for SIGTERM when its
parent dies (PR_SET_PDEATHSIG), even by SIGKILL, so it saves its position and frees its run directory instead of
running on unseen. Done here, before main.py runs, rather than in ``Popen(preexec_fn=...)``, which is unsafe in
a process with threads (the sweep's progress bar has one).
"""
from __future__ import annotations

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the sweep died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from main import main  # noqa: E402 - after the path

    die_with_parent()
    sys.exit(main(sys.argv[1:]))
