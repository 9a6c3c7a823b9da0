"""Run outputs besides checkpoints: the run directory, metrics.jsonl, TensorBoard, the curves PNG."""
from __future__ import annotations

import datetime
import json
import os
import shutil

import torch
import yaml


def new_run_dir(results_dir: str, dataset: str, batch_size: int, method: str) -> str:
    """``results/<dataset>/<bs>_<Method>/<YYYY-MM-DD-HH-MM-SS>`` (suffixed if that second is taken)."""
    parent = os.path.join(results_dir, dataset, f"{batch_size}_{method}")
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


# Settings of one invocation, not of the run: never taken from a resumed run's saved settings, and left
# out of config.yaml so that ``--config RUN/config.yaml`` starts a run like this one.
PER_INVOCATION_KEYS = ("train_from", "log_dir", "config", "stop_after_epoch", "train_mode", "checkpoint_dir")


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
    """The run's resolved settings (flag names as keys), as ``--config`` reads them."""
    kept = {k: v for k, v in cfg.items() if k not in PER_INVOCATION_KEYS}
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(kept, f, sort_keys=True)


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
    """Append-only JSON lines, one record per epoch; on resume, records past the checkpoint go."""

    def __init__(self, run_dir: str, resume_epoch: int | None) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_epoch is not None and os.path.exists(self.path):
            kept = [r for r in self.read() if r.get("epoch", 0) <= resume_epoch]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: list[dict], path: str, title: str) -> None:
    """Loss and similarity curves against epoch, as a PNG next to the checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    monitored = [r for r in records if "knn_top1" in r]
    diagnosed = [r for r in records if "erank" in r]
    panels = 2 + bool(monitored) + 2 * bool(diagnosed)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    ax1, ax2 = axes[0], axes[1]
    if monitored:
        axes[2].plot([r["epoch"] for r in monitored], [r["knn_top1"] for r in monitored], marker="o")
        axes[2].set_xlabel("epoch")
        axes[2].set_ylabel("kNN top-1 on test (%)")
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
    ax2.legend()
    if diagnosed:  # alignment/uniformity (Wang & Isola), then rank and, for contrastive methods, log S
        ax3, ax4 = axes[-2], axes[-1]
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
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
