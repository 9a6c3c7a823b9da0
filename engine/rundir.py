"""A pretraining run's directory: chosen and claimed by rank 0 (one naming rule: ``results/<dataset>/<bs>_<Method>/
<date>``), locked against a second process, its files (config.yaml, metrics.jsonl, TensorBoard events,
checkpoints written in the background), what a stopped run tells its user, and taking back what a failed run
wrote."""
from __future__ import annotations

import fcntl
import os
import socket
import sys
from argparse import Namespace

import torch
from tqdm import tqdm

from common.distributed import DistInfo, all_gather_object, all_reduce_sum, on_main_only, shared_outcome
from common.errors import UserError
from engine import checkpoint as ckpt_io
from engine.runlog import EventLog, Meter, MetricsLog, deepest_existing, new_run_dir, runs_of, take_back
from engine.trainer import Trainer, runaway_message
from engine.stop import StopRequests
from models import METHODS


PREEMPTED_MARK = ".preempted"  # left in the run directory by a run that saved its position and stopped


def resume_command(run_dir: str) -> str:
    """What an interrupted run tells its user: the command that continues it, or that none was saved yet."""
    if not ckpt_io.all_checkpoints(run_dir):
        return "no checkpoint was written yet; run the same command again to start over"
    return f"the last checkpoint written is intact; continue with: python main.py --log_dir {run_dir} --train_from latest"


class RunClaim:
    """The run directory for the life of a run: chosen and created by rank 0, locked against a second process,
    and, when the run fails before it saves a checkpoint, given back as it was (the files this tool writes there
    removed or restored; the directory and the parents it made removed when nothing else is in them)."""

    OWN_FILES = ("config.yaml", "metrics.jsonl", "curves.png", PREEMPTED_MARK)  # and TensorBoard's events files

    def __init__(self, cfg: Namespace, dist: DistInfo, resuming: bool, resume_path: str | None = None) -> None:
        self.cfg, self.dist, self.resuming, self.resume_path = cfg, dist, resuming, resume_path
        self.dir, self.lock, self.created, self.saved_any = None, None, False, False
        self.existing: str | None = None  # the deepest directory on the run's path that was there before it
        self.before: set[str] = set()
        self.texts: dict[str, bytes] = {}

    def __enter__(self) -> "RunClaim":
        outcome = on_main_only(self._claim) if self.dist.is_main else None
        self.dir = shared_outcome(outcome if not isinstance(outcome, OSError) else UserError(
            f"cannot write the run directory {outcome.filename or self.cfg.log_dir} ({outcome.strerror}); pass a "
            "--log_dir or --results_dir you can write to"))
        return self

    def _claim(self) -> str:
        cfg = self.cfg
        try:
            planned = cfg.log_dir or runs_of(cfg.results_dir, cfg.dataset_name, cfg.batch_size,
                                             METHODS[cfg.clr].display_for(cfg))
            self.existing = deepest_existing(planned)
            run_dir = cfg.log_dir or new_run_dir(cfg.results_dir, cfg.dataset_name, cfg.batch_size,
                                                 METHODS[cfg.clr].display_for(cfg))
            self.created = not cfg.log_dir or not os.path.exists(run_dir)
            os.makedirs(run_dir, exist_ok=True)
            self.before = set(os.listdir(run_dir))
            self.lock = lock_run_dir(run_dir)
            if not self.resuming and ckpt_io.all_checkpoints(run_dir):
                raise UserError(f"{run_dir} already holds checkpoints; resume it with --train_from latest "
                                "or choose another --log_dir")
            newest = max(ckpt_io.all_checkpoints(run_dir).items(), default=(None, None))[1]
            if self.resuming and cfg.train_from == "latest" and newest and self.resume_path \
                    and os.path.abspath(newest) != os.path.abspath(self.resume_path):
                raise UserError(f"{newest} appeared after this run chose {os.path.basename(self.resume_path)} "
                                "(did another process write to the run?); resume again with --train_from latest")
            if not self.resuming and os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
                raise UserError(f"{run_dir} holds another run's metrics.jsonl but no checkpoint to continue; "
                                "choose another --log_dir")
        except BaseException:
            self.release()
            raise
        self.texts = {name: open(os.path.join(run_dir, name), "rb").read() for name in self.OWN_FILES
                      if os.path.isfile(os.path.join(run_dir, name))}
        if self.lock is not None:
            self.lock.seek(0)
            self.lock.truncate()
            self.lock.write(f"pid {os.getpid()} on {socket.gethostname()}")  # named to a second process
            self.lock.flush()
        ckpt_io.remove_stale_temp_files(run_dir)
        if os.path.exists(os.path.join(run_dir, PREEMPTED_MARK)):
            os.remove(os.path.join(run_dir, PREEMPTED_MARK))  # this run continues it
        return run_dir

    def __exit__(self, kind, value, tb) -> None:
        try:
            if kind is not None and self.dist.is_main and not self.saved_any:
                self.give_back()
        finally:
            self.release()

    def give_back(self) -> None:
        """Remove what this invocation wrote, restore what it rewrote."""
        for name in set(os.listdir(self.dir)) - self.before:
            if name in self.OWN_FILES or name.startswith("events.out.tfevents") or name == ".lock":
                os.remove(os.path.join(self.dir, name))
        for name, content in self.texts.items():
            with open(os.path.join(self.dir, name), "wb") as f:
                f.write(content)
        if self.created:  # and the parents it made, up to the deepest directory that was there before
            take_back(self.dir, None, True, stop_at=self.existing, only_if_empty=True)

    def release(self) -> None:
        if self.lock is not None:
            HELD.discard(os.path.realpath(os.path.dirname(self.lock.name)))  # RUN/.lock
            self.lock.close()  # closing the file releases the lock
            self.lock = None


def lock_run_dir(run_dir: str):
    """An exclusive POSIX lock (``lockf``: per process, not inherited by forked DataLoader workers) on
    ``RUN/.lock``, released when the file closes or the process dies. On a filesystem without locks (some
    NFS and Lustre mounts) the run goes on unlocked, with a warning."""
    path = os.path.join(run_dir, ".lock")
    f = open(path, "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{run_dir} is in use by {holder}; wait for that run to end or choose another --log_dir")
    except OSError as err:
        print(f"warning: cannot lock {path} ({err.strerror}); nothing stops a second run in {run_dir}",
              file=sys.stderr)
    HELD.add(os.path.realpath(run_dir))
    return f


HELD: set[str] = set()  # the run directories this process has locked (real paths)


def run_holder(run_dir: str) -> str | None:
    """Who holds ``RUN/.lock`` now (a run still training: "pid N on HOST"), or None when no process does. POSIX
    drops all of a process's locks on a file when it closes any descriptor of it, so the lock file of a run this
    process holds (:data:`HELD`) is not even opened: that run is "this process"."""
    if os.path.realpath(run_dir) in HELD:
        return "this process"
    path = os.path.join(run_dir, ".lock")
    try:
        f = open(path)
    except OSError:
        return None
    with f:
        try:
            fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return f.read().strip() or "another process"
        except OSError:  # no locks on this filesystem: nothing to tell
            return None
        return None


class RunFiles:
    """The run directory and what rank 0 writes into it (TensorBoard, metrics.jsonl, curves, checkpoints)."""

    def __init__(self, cfg: Namespace, dist: DistInfo, claim: RunClaim, schedule: dict, epoch_setters: list) -> None:
        self.cfg, self.dist, self.claim, self.schedule, self.setters = cfg, dist, claim, schedule, epoch_setters
        self.dir = claim.dir
        self.writer = self.metrics = None
        self.writes = ckpt_io.BackgroundWriter()  # rank 0's checkpoint writes

    def open_logs(self, purge_step: int | None, resume_epoch: int | None) -> None:
        self.metrics = MetricsLog(self.dir, resume_epoch=resume_epoch)  # first: a broken record creates nothing
        self.writer = EventLog(self.dir, purge_step=purge_step)  # its failed writes are one line naming the file
        cfg = self.cfg
        width = f" at width {cfg.width_multiplier:g}" if cfg.width_multiplier != 1 else ""
        print(f"run directory: {self.dir} ({METHODS[cfg.clr].display_for(cfg)}, {cfg.arch}{width}, global batch "
              f"{cfg.batch_size})", flush=True)

    def scalars(self, values: dict, step: int, prefix: str = "train") -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def save(self, trainer: "Trainer", epoch: int, batch: int = 0, meter: Meter | None = None) -> str:
        """A checkpoint after ``epoch`` epochs and ``batch`` more steps; a collective: every rank calls it.
        Refused on every rank when any weight or buffer is NaN or inf: a poisoned checkpoint is never written."""
        unset = getattr(trainer.method, "MAY_BE_UNSET", ())  # NaN by design until set (InsDis's NCE normaliser)
        tensors = [t for k, t in trainer.method.state_dict().items() if t.is_floating_point() and k not in unset]
        runaway = trainer.runaway if trainer.runaway is not None else (torch.zeros(()),) * 2
        bad, runaway, growth = all_reduce_sum(torch.stack([
            torch.stack([(~torch.isfinite(t)).sum() for t in tensors]).sum().float(),
            *(t.float().to(tensors[0].device) for t in runaway)])).tolist()
        where = f"resume from {trainer.last_ckpt} " if trainer.last_ckpt else ""
        if runaway:
            raise UserError(runaway_message(growth / self.dist.world_size, not trainer.weights_finite(),
                                            f"step {trainer.step} of the run", where))
        if bad:
            raise UserError(f"weights are not finite after epoch {epoch + (1 if batch else 0)}, step {trainer.step}; "
                            f"nothing was saved: lower --lr or use --precision fp32, then {where}rerun")
        ranks = all_gather_object((ckpt_io.rng_state(), self.setters[0].state()))
        path = None
        if self.dist.is_main:
            path = os.path.join(self.dir, ckpt_io.checkpoint_name(epoch, batch))
            state = ckpt_io.training_state(epoch=epoch, step=trainer.step, method=trainer.method,
                                           optimizer=trainer.optimizer, scaler=trainer.scaler, schedule=self.schedule,
                                           ranks=ranks, args=vars(self.cfg), batch=batch,
                                           meter=meter.state() if meter is not None else None,
                                           probe=trainer.probe.state_dict() if trainer.probe is not None else None)
            background = not trainer.stop_now  # a stopping run waits for its last checkpoint
            path = on_main_only(lambda: self._write(state, path, (epoch, batch), background))
        trainer.last_ckpt = shared_outcome(path)
        if isinstance(trainer.requests, StopRequests):
            trainer.requests.saved()
        return trainer.last_ckpt

    def _write(self, state: dict, path: str, position: tuple[int, int], background: bool) -> str:
        """Rank 0's save through the checkpoint manager (:func:`engine.checkpoint.write`)."""

        def saved() -> None:
            self.claim.saved_any = True  # from now on a failing run keeps what it wrote
            tqdm.write(f"saved {path}")

        return ckpt_io.write(self.writes, state, path, self.dir, self.cfg, position, background, after=saved)

    def finish_writes(self, quiet: bool = False) -> None:
        """Waits for rank 0's write in flight; its failure reaches every rank (``quiet``: only printed, when
        the run is already failing for another reason)."""
        if quiet:
            if self.dist.is_main:
                try:
                    self.writes.close()
                except BaseException as err:  # noqa: BLE001 - the run's own error is the one to raise
                    print(f"warning: the last checkpoint write failed too: {err}", file=sys.stderr)
            return
        shared_outcome(on_main_only(self.writes.close) if self.dist.is_main else None)

    def close(self, message: str) -> None:
        if self.writer is not None:
            self.writer.close()
            print(message, flush=True)

