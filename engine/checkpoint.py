"""Checkpoints, both directions: what one holds (:func:`training_state`), how it is written
(:func:`atomic_save`), found (:func:`list_checkpoints`, :func:`resolve_checkpoint`), read
(:func:`load_checkpoint`) and restored into a run (:func:`restore`, :func:`restore_rng`).

Named ``checkpoint_{epoch:04d}.pth.tar`` where epoch = epochs completed.

Written atomically (temporary file in the same directory, then ``os.replace``), so a job killed
mid-write leaves the previous checkpoint intact. They hold plain tensors and Python scalars only,
which is what lets them load with ``torch.load(weights_only=True)``; nothing falls back to unsafe
unpickling.
"""
from __future__ import annotations

import glob
import os
import pickle
import random
import re
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn

from common.distributed import DistInfo
from common.errors import UserError

CKPT_RE = re.compile(r"checkpoint_(\d{4,})\.pth\.tar$")


def checkpoint_name(epoch: int) -> str:
    return f"checkpoint_{epoch:04d}.pth.tar"


def list_checkpoints(run_dir: str) -> dict[int, str]:
    """{epoch: path} of the checkpoints in ``run_dir``."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(run_dir), "checkpoint_*.pth.tar")):
        m = CKPT_RE.search(os.path.basename(path))
        if m:
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))


def atomic_save(obj, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth.tar", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """Load with ``weights_only=True``; a file that needs arbitrary unpickling is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot load checkpoint {path}: {first}; it is corrupt or was not written by this tool "
            "(only weights_only-safe checkpoints are read)"
        ) from err


def resolve_checkpoint(run_dir: str, name: str) -> str:
    """``--train_from`` value -> path: 'latest', a file name inside ``run_dir``, or a path."""
    available = list_checkpoints(run_dir)
    if name == "latest":
        if not available:
            raise UserError(f"no checkpoint_*.pth.tar in {run_dir}; start a new run without --train_from")
        return available[max(available)]
    for candidate in (os.path.join(run_dir, name), name):
        if os.path.isfile(candidate):
            return candidate
    have = ", ".join(os.path.basename(p) for p in available.values()) or "none"
    raise UserError(f"checkpoint {name} not found in {run_dir} (available: {have}); "
                    "pass one of those to --train_from, or 'latest'")


def training_state(*, epoch: int, step: int, method: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, schedule: dict, rng: list, args: dict) -> dict:
    """Everything a resume needs, as weights_only-loadable tensors and Python values.

    ``model`` is the unwrapped method's state (no ``module.`` prefixes; EMA target and memory bank are
    buffers in it), ``rng`` one state per rank, ``scheduler`` the learning-rate schedule the run follows,
    ``args`` the resolved settings (what a resume and an evaluation read back).
    """
    return {"epoch": epoch, "global_step": step, "clr": args["clr"], "arch": args["arch"],
            "model": method.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": schedule,
            "scaler": scaler.state_dict(), "rng": rng, "args": args}


def restore(state: dict, path: str, method: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, steps_per_epoch: int) -> tuple[int, int]:
    """Loads a checkpoint's weights and optimizer/scaler state; returns (epochs, steps) completed, the steps
    counted with this run's steps per epoch so that the schedule continues at the start of the next epoch."""
    try:
        method.load_state_dict(state["model"])
    except RuntimeError as err:
        raise UserError(f"{path} does not match this model ({str(err).splitlines()[0]}); "
                        "resume with the run's own --model/--clr/head flags") from err
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    epoch = int(state["epoch"])
    step = epoch * steps_per_epoch
    saved_step = state.get("global_step")
    if saved_step is not None and int(saved_step) != step:
        print(f"note: {path} was written after {saved_step} steps ({epoch} epochs); this run has {steps_per_epoch} "
              f"steps per epoch, so its schedule continues from step {step}", file=sys.stderr)
    return epoch, step


def restore_rng(state: dict, dist: DistInfo) -> None:
    """This rank's random streams as they were when the checkpoint was written (needs the same world size)."""
    states = state.get("rng", [])
    if len(states) == dist.world_size:
        set_rng_state(states[dist.rank])
    elif dist.is_main:
        print(f"warning: checkpoint has RNG states for {len(states)} process(es), this run has "
              f"{dist.world_size}; continuing with fresh random streams", file=sys.stderr)


def rng_state() -> dict:
    """This process's RNG states as tensors and Python scalars (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x):
    """random.setstate needs tuples; a round trip through torch.save may hand back lists."""
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
