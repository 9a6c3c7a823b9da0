"""Run outputs besides checkpoints: the run directory, metrics.jsonl, TensorBoard, the curves PNG.

A file that cannot be written (a full disk, a read-only mount) is one line naming it: :func:`unwritable`.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import sys
import threading

import torch
import yaml

from common.errors import UserError
# Settings of one invocation, not of the run (marked per_invocation where declared): never taken from a resumed
# run's saved settings, and left out of config.yaml so that ``--config RUN/config.yaml`` starts a run like this one.
from engine.settings import NOT_SAVED_KEYS

RESUME_HINT = "make room, then resume with --train_from latest"
RERUN_HINT = "make room, then run the same command again"


def unwritable(path: str, err: OSError, fix: str = RESUME_HINT) -> UserError:
    """The one line for a run file that could not be written: the file, the system's reason, the fix."""
    return UserError(f"could not write {path} ({err.strerror or err}); {fix}")


def runs_of(results_dir: str, dataset: str, batch_size: int, method: str) -> str:
    """``results/<dataset>/<bs>_<Method>``: where the runs of one kind live (the one naming rule)."""
    return os.path.join(results_dir, dataset, f"{batch_size}_{method}")


def deepest_existing(path: str) -> str:
    """The deepest directory on ``path`` that exists (what a failed run must not remove)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def new_run_dir(results_dir: str, dataset: str, batch_size: int, method: str) -> str:
    """``results/<dataset>/<bs>_<Method>/<YYYY-MM-DD-HH-MM-SS>`` (suffixed if that second is taken)."""
    parent = runs_of(results_dir, dataset, batch_size, method)
    os.makedirs(parent, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    for n in range(1000):
        path = os.path.join(parent, stamp if n == 0 else f"{stamp}-{n}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run directory under {parent}")



def take_back(path: str, before: set[str] | None, created: bool, stop_at: str | None = None,
              only_if_empty: bool = False) -> None:
    """Undo what a failed run or evaluation wrote in ``path``: the directory when it made it (with
    ``only_if_empty``, only when nothing is left in it) and the empty parents up to ``stop_at``; else the
    entries that were not there ``before``."""
    if not os.path.isdir(path):
        return
    if created:
        if only_if_empty and os.listdir(path):
            return
        shutil.rmtree(path, ignore_errors=True)
        parent, top = os.path.dirname(os.path.abspath(path)), os.path.abspath(stop_at) if stop_at else None
        while top and parent.startswith(top + os.sep) and not os.listdir(parent):
            os.rmdir(parent)
            parent = os.path.dirname(parent)
        return
    for name in set(os.listdir(path)) - (before or set()):
        entry = os.path.join(path, name)
        shutil.rmtree(entry) if os.path.isdir(entry) else os.remove(entry)


def write_config(run_dir: str, cfg: dict) -> None:
    """The run's resolved settings (flag names as keys), as ``--config`` reads them; written whole or not at all."""
    kept = {k: v for k, v in cfg.items() if k not in NOT_SAVED_KEYS}
    path = os.path.join(run_dir, "config.yaml")
    _replace(path, lambda f: yaml.safe_dump(kept, f, sort_keys=True), RERUN_HINT)


def write_json(path: str, record: dict) -> None:
    """A json file written whole or not at all."""
    _replace(path, lambda f: json.dump(record, f, indent=2, sort_keys=True, default=str), RERUN_HINT,
             unique=True)


def _replace(path: str, write, fix: str, unique: bool = False) -> None:
    """``write(f)`` into a temporary file beside ``path``, then the file in one rename; a failure leaves ``path``
    as it was and is one line naming it. ``unique``: a temporary name of this writer's own, for a file two
    processes may write at once (the shared baseline cache): each renames a whole file."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp" if unique else path + ".tmp"
    try:
        with open(tmp, "w") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise unwritable(path, err, fix) from err


class Meter:
    """Running means of scalar tensors, summed on their device; reading them is the one host sync. A value
    logged on some steps only (the diagnostics of logging steps) is averaged over the steps that had it."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            if k in self.sums:
                self.sums[k].add_(v)  # in place: no new tensor per value and step
            else:
                self.sums[k] = v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1

    def means(self) -> dict[str, float]:
        if not self.sums:
            return {}
        sums = torch.stack(list(self.sums.values())).tolist()  # one host sync, not one per value
        return {k: total / self.counts[k] for k, total in zip(self.sums, sums)}

    def state(self) -> dict:
        """The sums (on the CPU) and counts, for a mid-epoch checkpoint."""
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}, "count": self.count,
                "counts": dict(self.counts)}

    @classmethod
    def from_state(cls, state: dict | None, device: torch.device) -> "Meter":
        meter = cls()
        if state:
            meter.sums = {k: v.to(device) for k, v in state["sums"].items()}
            meter.count = int(state["count"])
            meter.counts = {k: int(state.get("counts", {}).get(k, meter.count)) for k in meter.sums}
        return meter


class MetricsLog:
    """Append-only JSON lines, one record (a json object with its ``epoch``) per epoch; on resume, records past
    the checkpoint go. A last line that is not valid json is one a killed process half-wrote: a resume drops it
    with a warning, a reader (:meth:`read`) names it. Any other line that is not a record is one line saying
    which, and how to fix it."""

    def __init__(self, run_dir: str, resume_epoch: int | None) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_epoch is not None and os.path.exists(self.path):
            records, torn = self.parse()
            if torn is not None:
                print(f"warning: {self.path} line {torn} is not valid json (half-written by a run that was killed); "
                      "this resume drops it", file=sys.stderr)
            kept = [r for r in records if r["epoch"] <= resume_epoch]
            _replace(self.path, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept), RERUN_HINT)

    def append(self, record: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise unwritable(self.path, err) from err

    def read(self) -> list[dict]:
        """Every record; a half-written last line is one line too (a resume drops it)."""
        records, torn = self.parse()
        if torn is not None:
            raise UserError(f"{self.path} line {torn} is not valid json (half-written?); resuming the run "
                            "(--train_from latest) drops it")
        return records

    def parse(self) -> tuple[list[dict], int | None]:
        """(the records, the number of a half-written last line or None); a broken line before the last is
        one line naming it."""
        if not os.path.exists(self.path):
            return [], None
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
            raise UserError(f"cannot read {self.path} ({reason}); fix its permissions or move it away, "
                            "then run again") from err
        records, torn = [], None
        for i, (n, line) in enumerate(lines):
            try:
                record = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:
                    torn = n
                    break
                raise UserError(f"{self.path} line {n} is not valid json; delete or repair that line (the other "
                                "lines are the run's records), then run again") from None
            epoch = record.get("epoch") if isinstance(record, dict) else None
            if not isinstance(epoch, (int, float)) or isinstance(epoch, bool) or not math.isfinite(epoch):
                raise UserError(f"{self.path} line {n} is not a record of this tool (a json object with its epoch); "
                                "delete or repair that line, then run again")
            records.append(record)
        return records, torn


class EventLog:
    """TensorBoard's SummaryWriter for a run directory, whose failed writes (a full disk) are one line naming
    the events file instead of a traceback from TensorBoard's writer thread."""

    def __init__(self, run_dir: str, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        _quiet_event_writer_threads()
        self.path = os.path.join(run_dir, "events.out.tfevents.*")  # the file's own name once it exists
        try:
            self.writer = SummaryWriter(run_dir, purge_step=purge_step)
        except OSError as err:
            raise unwritable(self.path, err, RERUN_HINT) from err
        self.path = getattr(getattr(self.writer.file_writer, "event_writer", None), "_file_name", self.path)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        try:
            self.writer.add_scalar(tag, value, step)
        except OSError as err:
            raise unwritable(self.path, err) from err

    def close(self) -> None:
        """Flushes first: TensorBoard's close alone would not report a write its thread failed."""
        try:
            self.writer.flush()
            self.writer.close()
        except OSError as err:
            raise unwritable(self.path, err) from err


def _quiet_event_writer_threads() -> None:
    """TensorBoard's writer thread hands a failed write to the next ``add_scalar``/``close`` (which EventLog
    makes one line) and then re-raises it, which Python would print as a second report with a traceback."""
    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:  # another TensorBoard: its thread's report stays
        return
    previous = threading.excepthook
    if getattr(previous, "quiets_event_writers", False):
        return

    def hook(args) -> None:
        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.quiets_event_writers = True
    threading.excepthook = hook


def _plot_diagnostics(ax3, ax4, diagnosed: list[dict]) -> None:
    """Alignment and uniformity (Wang & Isola), then the effective rank and, for contrastive methods, log S."""
    x = [r["epoch"] for r in diagnosed]
    for key in ("alignment", "uniformity"):
        if all(key in r for r in diagnosed):
            ax3.plot(x, [r[key] for r in diagnosed], marker="o", label=key)
    ax3.set_xlabel("epoch")
    ax3.legend(fontsize=8)
    ax4.plot(x, [r["erank"] for r in diagnosed], marker="o", color="C3", label="effective rank")
    ax4.set_xlabel("epoch")
    ax4.set_ylabel("effective rank", color="C3")
    if all("log_s" in r for r in diagnosed):
        twin = ax4.twinx()
        twin.plot(x, [r["log_s"] for r in diagnosed], marker=".", color="C0", label="mean log S")
        twin.set_ylabel("mean log S", color="C0")


def plot_curves(records: list[dict], path: str, title: str) -> None:
    """Loss and similarity curves against epoch, as a PNG next to the checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    monitors = [(key, label) for key, label in (("knn_top1", "kNN"), ("probe_top1", "online probe"))
                if any(key in r for r in records)]
    diagnosed = [r for r in records if "erank" in r]
    panels = 2 + bool(monitors) + 2 * bool(diagnosed)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    ax1, ax2 = axes[0], axes[1]
    for key, label in monitors:
        measured = [r for r in records if key in r]
        axes[2].plot([r["epoch"] for r in measured], [r[key] for r in measured], marker="o", label=label)
        axes[2].set_xlabel("epoch")
        axes[2].set_ylabel("top-1 on test (%)")
    if len(monitors) > 1:
        axes[2].legend()
    ax1.plot(epochs, [r["loss"] for r in records], marker="o", label="loss")
    if all("infonce" in r for r in records):
        ax1.plot(epochs, [r["infonce"] for r in records], marker=".", label="InfoNCE")
    if all("mi_bound" in r for r in records):
        ax1.plot(epochs, [r["mi_bound"] for r in records], marker="x", label="MI bound log K - InfoNCE")
        ax1.axhline(records[-1]["log_k"], color="grey", linestyle=":", label="log K (its ceiling)")
    ax1.set_xlabel("epoch")
    ax1.legend(fontsize=8)
    for key in ("pos_sim", "neg_sim"):
        if all(key in r for r in records):
            ax2.plot(epochs, [r[key] for r in records], marker="o", label=key.replace("_", " "))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("cosine similarity")
    if ax2.get_legend_handles_labels()[0]:  # a method that logs no similarities (the meta heads)
        ax2.legend()
    if diagnosed:
        _plot_diagnostics(axes[-2], axes[-1], diagnosed)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise unwritable(path, err) from err
    finally:
        plt.close(fig)
