"""``--train_mode=summary``: what runs are in a directory and where each stands (the "what did I run last
week" question).

    python main.py --train_mode=summary --checkpoint_dir results/          # every run below results/
    python main.py --train_mode=summary --checkpoint_dir RUN               # one run

One markdown row per run: method, dataset, batch, epochs done of planned, the last epoch's loss, the evaluation
results found in RUN/eval, and whether it is complete, can be resumed (and how), or has no checkpoint.
"""
from __future__ import annotations

import glob
import json
import os

import yaml

from common.errors import UserError
from engine.checkpoint import all_checkpoints
from engine.pretrain import PREEMPTED_MARK
from engine.runlog import MetricsLog


def find_runs(path: str) -> list[str]:
    """``path`` itself when it is a run (it has a config.yaml), else every run below it, sorted."""
    if not os.path.isdir(path):
        raise UserError(f"--checkpoint_dir {path} does not exist; pass a run directory or a results directory")
    if os.path.isfile(os.path.join(path, "config.yaml")):
        return [path]
    runs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "**", "config.yaml"), recursive=True))
    if not runs:
        raise UserError(f"no run (a directory with config.yaml) in {path}; pass a run directory or results/")
    return runs


def describe_run(run: str) -> dict:
    with open(os.path.join(run, "config.yaml")) as f:
        cfg = yaml.safe_load(f) or {}
    ckpts = all_checkpoints(run)
    done = max((e for e, b in ckpts if b == 0), default=0)
    mid = max(((e, b) for e, b in ckpts if b), default=None)
    planned = int(cfg.get("epochs") or 0)
    records = MetricsLog(run, resume_epoch=None).read()  # reads only
    loss = records[-1].get("loss") if records else None
    evals = []
    for record in sorted(glob.glob(os.path.join(run, "eval", "*.json"))):
        with open(record) as f:
            r = json.load(f)
        if "top1" in r:
            evals.append(f"{os.path.splitext(os.path.basename(record))[0]} {r['top1']:.2f}%")
    if not ckpts:
        state = "no checkpoint (failed before its first save, or still starting)"
    elif done >= planned and not (mid and mid[0] >= done):
        state = "complete"
    else:
        where = f"epoch {mid[0]} + {mid[1]} steps" if mid and mid[0] >= done else f"epoch {done}"
        preempted = " (preempted)" if os.path.exists(os.path.join(run, PREEMPTED_MARK)) else ""
        state = f"resumable from {where}{preempted}: --log_dir {run} --train_from latest"
    return {"run": run, "method": cfg.get("clr", "?"), "dataset": cfg.get("dataset_name", "?"),
            "batch": cfg.get("batch_size", "?"), "epochs": f"{done}/{planned}",
            "loss": "-" if loss is None else f"{loss:.4f}", "evals": ", ".join(evals) or "-", "state": state}


def print_summary(path: str) -> list[dict]:
    rows = [describe_run(run) for run in find_runs(path)]
    keys = ["run", "method", "dataset", "batch", "epochs", "loss", "evals", "state"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    return rows
