"""The checkpoint manager of a run: what a checkpoint holds (:func:`training_state`), which one a resume takes
(:func:`resolve_checkpoint`, :func:`load_latest` with its fallback), that every rank took the same one
(:func:`agree_across_ranks`), whether it belongs to the run (:func:`check_identity`), its writes (:func:`write`: atomic, in the background by :class:`BackgroundWriter`, then retention:
:func:`retain`) and restore (:func:`restore`, :func:`restore_rng`). The file format itself (names,
the verified read, atomic writes with their checksum, backbone extraction, the original repositories' layouts)
is :mod:`models.checkpoint_file`, the one module that calls ``torch.load``.

One naming scheme: ``checkpoint_{E:04d}.pth.tar`` after E completed epochs, and
``checkpoint_{E:04d}_step{k:06d}.pth.tar`` k steps into epoch E + 1 (mid-epoch: a preemption or
``--save_every_n_steps/minutes``). They order by (E, k); ``latest`` is the largest. Evaluation reads the
epoch-end ones; a run keeps only the newest few mid-epoch ones, and none older than its last epoch end.
Of the epoch-end ones it keeps the newest ``--keep_checkpoints`` and the milestones (every
``--milestone_every_n_epochs``): :func:`prune_epoch_ends`.

Rank 0 writes from a background thread (:class:`BackgroundWriter`) once the state is copied to host
memory, so no rank waits for the disk; resuming maps the file (``mmap=True``) instead of reading it.

Written atomically (temporary file in the same directory, then ``os.replace``), so a job killed
mid-write leaves the previous checkpoint intact. They hold plain tensors and Python scalars only,
which is what lets them load with ``torch.load(weights_only=True)``; nothing falls back to unsafe
unpickling.
"""
from __future__ import annotations

import glob
import os
import queue
import random
import sys
import threading
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from common.distributed import DistInfo, all_gather_object, launched_rank
from common.errors import UserError
from common.yamlfile import read_mapping
from engine.settings import IDENTITY_KEYS
from models import METHODS
from models.checkpoint_file import (CheckpointError, all_checkpoints, atomic_save,  # noqa: F401 - the run's API
                                    checkpoint_name, list_checkpoints, read_checkpoint, read_file,
                                    remove_checkpoint)

def identity_keys(clr: str) -> tuple[str, ...]:
    """The settings that define what a ``clr`` run *is*: a resumed run keeps them, a flag that changes one is an
    error, and a checkpoint that differs in one is not this run's. The core ones are marked ``identity`` where
    they are declared (:mod:`engine.settings`); each method adds its own (``MethodSpec.identity``)."""
    return IDENTITY_KEYS + (METHODS[clr].identity if clr in METHODS else ())


def load_checkpoint(path: str, verify: bool = True) -> dict:
    """A checkpoint read through the one verified reader (:func:`models.checkpoint_file.read_checkpoint`):
    checksum (``verify``; the ranks of a resume other than rank 0 skip it, rank 0 checks for all), then
    ``weights_only`` with the tensors mapped from the file (copy-on-write), then the layout checks."""
    return read_checkpoint(path, verify)


def agree_across_ranks(path: str, state: dict) -> None:
    """Every rank chose the checkpoint to resume on its own: they must have chosen the same one (rank 0 may have
    found the newest corrupt, as only it reads the checksums, and moved it aside)."""
    chosen = all_gather_object((path, int(state["epoch"]), int(state.get("batch", 0))))
    if len(set(chosen)) > 1:
        raise UserError(f"the ranks would resume from different checkpoints ({sorted(set(chosen))}); check that "
                        "every node sees the same run directory, then resume again (a corrupt newest checkpoint "
                        "has been moved aside by rank 0)")


def run_identity(run_dir: str) -> dict | None:
    """The settings a run directory was started with (its config.yaml), or None when it has none."""
    own = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(own):
        return None
    return read_mapping(own, own, of="of settings",
                        fix="; restore it from the run's checkpoint (its 'args') or start a new run")


def check_identity(run_dir: str, path: str, saved: dict) -> None:
    """A checkpoint continues ``run_dir`` only if it is the same kind of run (the identity settings of its
    config.yaml), wherever the file sits: one from outside the directory, or one placed inside it."""
    mine = run_identity(run_dir)
    if mine is None:
        return
    inside = os.path.dirname(os.path.abspath(path)) == os.path.abspath(run_dir)
    for key in identity_keys(mine.get("clr", "")):
        if key in mine and key in saved and mine[key] != saved[key]:
            if inside:
                raise UserError(f"{path} is not a checkpoint of this run: it was trained with --{key}={saved[key]}, "
                                f"the run with --{key}={mine[key]} (its config.yaml); move that file out of {run_dir}, "
                                "then resume")
            raise UserError(f"{path} comes from another kind of run (--{key}={saved[key]}) than {run_dir} "
                            f"(--{key}={mine[key]}); resume a run from its own checkpoints or start a new one")


def prune_mid_epoch(run_dir: str, keep: int, current: tuple[int, int]) -> list[str]:
    """After a save at position ``current``: delete the mid-epoch checkpoints older than the newest epoch-end
    one at or before it, and all but the newest ``keep`` mid-epoch ones up to it. Nothing at or after
    ``current`` is touched (the file just written, or checkpoints of a line the user resumed before)."""
    found = {key: path for key, path in all_checkpoints(run_dir).items() if key <= current}
    last_end = max((key for key in found if key[1] == 0), default=(-1, 0))
    mid = [key for key in found if key[1] > 0]
    newer = [key for key in mid if key > last_end]
    doomed = [key for key in mid if key < last_end] + newer[:max(0, len(newer) - keep)]
    doomed = [key for key in doomed if key != current]
    for key in doomed:
        remove_checkpoint(found[key])
    return [found[key] for key in doomed]


def prune_epoch_ends(run_dir: str, keep: int, milestone_every: int, current: int) -> list[str]:
    """After the epoch-end save of epoch ``current``: delete the epoch-end checkpoints up to it that are neither
    among the newest ``keep`` nor a milestone (epoch a multiple of ``milestone_every``; 0: none). ``keep`` 0
    keeps every one. Checkpoints after ``current`` (of a line the user resumed before) are not touched."""
    if keep <= 0:
        return []
    found = {epoch: path for epoch, path in list_checkpoints(run_dir).items() if epoch <= current}
    newest = sorted(found)[-keep:]
    doomed = [epoch for epoch in found
              if epoch not in newest and not (milestone_every and epoch % milestone_every == 0)]
    for epoch in doomed:
        remove_checkpoint(found[epoch])
    return [found[epoch] for epoch in doomed]


def retain(run_dir: str, cfg, position: tuple[int, int]) -> None:
    """Retention after the save at ``position`` (epochs, steps into the next): the mid-epoch rule, and at an
    epoch end the newest --keep_checkpoints plus the milestones."""
    prune_mid_epoch(run_dir, cfg.keep_mid_epoch_checkpoints, position)
    if position[1] == 0:
        prune_epoch_ends(run_dir, cfg.keep_checkpoints, milestone_every(cfg), position[0])


def milestone_every(cfg) -> int:
    """Epochs between the checkpoints kept for good (0: none): --milestone_every_n_epochs, by default ten saves."""
    m = cfg.milestone_every_n_epochs
    return 10 * cfg.save_every_n_epochs if m is None else m


def write(writer: BackgroundWriter, state: dict, path: str, run_dir: str, cfg, position: tuple[int, int],
          background: bool, after: Callable[[], None] = lambda: None) -> str:
    """Rank 0's save of a run's checkpoint: once the write before it is done (or has failed: then raises that), a
    host copy of ``state`` is written atomically with its checksum by ``writer`` (in its thread when
    ``background``), then ``after()`` and retention run; so a checkpoint is deleted only once a newer one is on
    disk."""
    writer.wait()
    host = to_host(state)

    def job() -> None:
        atomic_save(host, path)
        after()
        retain(run_dir, cfg, position)

    writer.submit(job, background)
    return path


def to_host(obj):
    """A copy of a nested checkpoint dict whose tensors live in host memory and share nothing with the run:
    what a background write may read while training goes on changing the weights in place."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


class BackgroundWriter:
    """Rank 0's file work (checkpoints and the records that follow them) done in order by one thread, so that
    no rank waits for the disk. The caller hands over host copies (:func:`to_host`) and goes on training.

    A thread, not torch.distributed.checkpoint's async save: the file stays the one ``torch.save`` file every
    reader here (evaluation, export, hub, the original repositories' loaders) takes, and only rank 0 writes.
    Jobs run in the order given; after a failure the later ones are dropped (an epoch's metrics line is never
    written when its checkpoint was not), and the failure is handed over once, by :meth:`take_failure` (which
    does not wait) or :meth:`wait`. The caller waits before making a checkpoint's host copy, so at most one
    exists besides the run's own state.
    """

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.reported = False

    def submit(self, job: Callable[[], object], background: bool = True) -> None:
        """Runs ``job`` after the ones given before it: in the thread, or (``background`` False) here, once they
        have run."""
        if not background:
            self.wait()
            job()
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
            self.thread.start()
        self.jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:  # close()
                    return
                if self.failure is None:
                    job()
            except BaseException as err:  # noqa: BLE001 - reported on the run's next step
                self.failure = err
            finally:
                del job  # a write job holds a host copy of the whole state
                self.jobs.task_done()

    def close(self) -> None:
        """Waits for the jobs given so far (raising a failure not handed over yet) and ends the thread."""
        try:
            self.wait()
        finally:
            if self.thread is not None:
                self.jobs.put(None)
                self.thread.join()
                self.thread = None

    def take_failure(self) -> BaseException | None:
        """The failure of a job that has run, once; does not wait for the jobs in flight."""
        if self.failure is None or self.reported:
            return None
        self.reported = True
        return self.failure

    def wait(self) -> None:
        """Until every job given so far has run; raises a failure not handed over yet."""
        self.jobs.join()
        err = self.take_failure()
        if err is not None:
            raise err


def remove_stale_temp_files(run_dir: str) -> list[str]:
    """Temp files a killed save left behind (the caller holds the run's lock, so none is being written)."""
    stale = [p for pattern in (".tmp_*.pth.tar", ".tmp_checkpoint_*.sha256")
             for p in glob.glob(os.path.join(glob.escape(run_dir), pattern)) if os.path.isfile(p)]
    for path in stale:
        os.remove(path)
    return stale


def load_latest(run_dir: str, verify: bool = True) -> tuple[str, dict]:
    """The newest checkpoint that loads and matches its checksum (``verify``); a bad newer one is skipped with a
    warning."""
    available = all_checkpoints(run_dir)
    if not available:
        raise UserError(f"no checkpoint_*.pth.tar in {run_dir}; start a new run without --train_from")
    for path in reversed(list(available.values())):
        try:
            return path, load_checkpoint(path, verify)
        except CheckpointError as err:  # renamed aside, so that it is not 'latest' again nor kept by the pruning
            aside = path + ".corrupt"
            if launched_rank() == 0:
                os.replace(path, aside)
            print(f"warning: {os.path.basename(path)} is unusable ({err}); moved to {os.path.basename(aside)}, "
                  "trying the one before", file=sys.stderr)
    raise UserError(f"no checkpoint in {run_dir} loads (all corrupt); start a new run")


def resolve_checkpoint(run_dir: str, name: str) -> str:
    """``--train_from`` value -> path: 'latest' (the newest, mid-epoch or not), a file name inside
    ``run_dir``, or a path."""
    available = all_checkpoints(run_dir)
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
                   scaler: torch.amp.GradScaler, schedule: dict, ranks: list, args: dict, batch: int = 0,
                   meter: dict | None = None, probe: dict | None = None) -> dict:
    """Everything a resume needs, as weights_only-loadable tensors and Python values.

    ``model`` is the unwrapped method's state (no ``module.`` prefixes; EMA target and memory bank are
    buffers in it), ``scheduler`` the learning-rate schedule the run follows, ``args`` the resolved settings
    (what a resume and an evaluation read back). ``ranks`` holds one (RNG states, loader states) pair per rank.
    A mid-epoch checkpoint (``batch`` > 0 steps into epoch ``epoch + 1``) also holds the epoch's running
    sums of the logged values (``meter``), so its metrics record ends as the uninterrupted one would.
    ``probe``: the online probe's weights and optimizer state (``--online_probe``), else None.
    """
    return {"epoch": epoch, "batch": batch, "global_step": step, "clr": args["clr"], "arch": args["arch"],
            "width_multiplier": args.get("width_multiplier", 1.0),
            "feat_dim": getattr(getattr(method, "backbone", None), "feat_dim", None),
            "model": method.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": schedule,
            "scaler": scaler.state_dict(), "rng": [rng for rng, _ in ranks], "loader": [lo for _, lo in ranks],
            "meter": meter, "args": args, "probe": probe}


def restore(state: dict, path: str, method: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, steps_per_epoch: int, world_size: int = 1,
            args: dict | None = None) -> tuple[int, int, int]:
    """Loads a checkpoint's weights and optimizer/scaler state; returns (epochs completed, steps into the
    next epoch, steps), the steps counted with this run's steps per epoch so that the schedule continues
    where the checkpoint left it."""
    try:
        method.load_state_dict(state["model"])
    except RuntimeError as err:
        raise UserError(f"{path} does not match this model ({str(err).splitlines()[0]}); "
                        "resume with the run's own --arch/--clr/head flags") from err
    optimizer.load_state_dict(to_host(state["optimizer"]))  # copies: the loaded tensors map the file
    scaler.load_state_dict(state["scaler"])
    epoch, batch = int(state["epoch"]), int(state.get("batch", 0))
    if batch:  # a mid-epoch position only means something to the same loader, batch and number of processes
        saved, now = state.get("args", {}), args or {}
        for key in ("batch_size", "limit_train_batches", "faster_version"):
            if key in saved and key in now and saved[key] != now[key]:
                raise UserError(f"{path} was written mid-epoch with --{key}={saved[key]}, not {now[key]}; resume it "
                                f"with --{key}={saved[key]}")
        if len(state.get("rng", [])) != world_size:
            raise UserError(f"{path} was written mid-epoch by {len(state.get('rng', []))} process(es) and can only "
                            f"resume with as many (this run has {world_size})")
        if batch >= steps_per_epoch or state.get("scheduler", {}).get("steps_per_epoch", steps_per_epoch) \
                != steps_per_epoch:
            raise UserError(f"{path} was written {batch} steps into an epoch of another length than this run's "
                            f"{steps_per_epoch} steps; resume with the run's own data and --limit_train_batches")
    step = epoch * steps_per_epoch + batch
    saved_step = state.get("global_step")
    if saved_step is not None and int(saved_step) != step:
        print(f"note: {path} was written after {saved_step} steps; this run has {steps_per_epoch} "
              f"steps per epoch, so its schedule continues from step {step}", file=sys.stderr)
    return epoch, batch, step


def restore_rng(state: dict, dist: DistInfo) -> dict:
    """This rank's random streams as they were when the checkpoint was written (needs the same world size);
    returns this rank's loader state ({} when there is none)."""
    states = state.get("rng", [])
    if len(states) == dist.world_size:
        set_rng_state(states[dist.rank])
        loaders = state.get("loader") or [{}] * dist.world_size
        return loaders[dist.rank]
    if dist.is_main:
        print(f"warning: checkpoint has RNG states for {len(states)} process(es), this run has "
              f"{dist.world_size}; continuing with fresh random streams", file=sys.stderr)
    return {}


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
