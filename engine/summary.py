"""``--train_mode=summary``: what runs are in a directory and where each stands (the "what did I run last
week" question).

    python main.py --train_mode=summary --checkpoint_dir results/          # every run below results/
    python main.py --train_mode=summary --checkpoint_dir RUN               # one run

One markdown row per run: method, dataset, batch, epochs done of planned, the last epoch's loss, the evaluation
results found in RUN/eval, and whether it is complete, can be resumed (and how), or has no checkpoint. A run
whose files are damaged (a config.yaml that is not a mapping of settings, a metrics.jsonl line a killed process
half-wrote, an unreadable evaluation record) is a row saying what is wrong; the other runs are listed as usual.
"""
from __future__ import annotations

import glob
import json
import math
import os

import yaml

from common.errors import UserError, first_line
from engine.checkpoint import all_checkpoints
from engine.rundir import PREEMPTED_MARK, run_holder
from engine.runlog import MetricsLog

COLUMNS = ["run", "method", "dataset", "arch", "batch", "epochs", "loss", "evals", "state"]


def find_runs(path: str) -> list[str]:
    """``path`` itself when it is a run (it has a config.yaml), else every run below it, sorted."""
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise UserError(f"--checkpoint_dir {path} {what}; pass a run directory or a results directory")
    if os.path.isfile(os.path.join(path, "config.yaml")):
        return [path]
    pattern = os.path.join(glob.escape(path), "**", "config.yaml")  # the user's path taken literally: exp[1]
    runs = sorted(os.path.dirname(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not runs:
        raise UserError(f"no run (a directory with config.yaml) in {path}; pass a run directory or results/")
    return runs


def read_config(run: str) -> tuple[dict, str | None]:
    """(the run's settings, None), or ({}, what is wrong with its config.yaml)."""
    try:
        with open(os.path.join(run, "config.yaml"), encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        return {}, f"config.yaml unreadable: {first_line(err)}"
    if cfg is None:
        return {}, "config.yaml unreadable: it is empty"
    if not isinstance(cfg, dict):
        return {}, f"config.yaml unreadable: a {type(cfg).__name__}, not a mapping of settings"
    epochs = cfg.get("epochs", 0)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        return cfg, f"config.yaml unreadable: epochs {epochs!r} is not a whole number"
    return cfg, None


def read_evals(run: str) -> list[str]:
    """``<record> <top-1>%`` of each evaluation record in RUN/eval; an unreadable one says so."""
    evals = []
    for record in sorted(glob.glob(os.path.join(glob.escape(run), "eval", "*.json"))):
        name = os.path.splitext(os.path.basename(record))[0]
        if name.endswith("_all_epochs"):  # --eval_all's table of the per-epoch records listed here anyway
            continue
        try:
            with open(record, encoding="utf-8") as f:
                r = json.load(f)
        except (ValueError, OSError) as err:
            evals.append(f"{name} unreadable ({first_line(err)})")
            continue
        top1 = r.get("top1") if isinstance(r, dict) else None
        if isinstance(top1, (int, float)) and not isinstance(top1, bool):
            evals.append(f"{name} {top1:.2f}%")
        elif isinstance(r, dict) and "top1" not in r:
            continue  # another kind of json (a t-SNE's or a fit's side record)
        else:
            evals.append(f"{name} unreadable (its top1 is {top1!r})")
    return evals


def describe_run(run: str) -> dict:
    """One row; what is wrong with the run's files, if anything, leads its state."""
    cfg, problem = read_config(run)
    problems = [problem] if problem else []
    ckpts = all_checkpoints(run)
    done = max((e for e, b in ckpts if b == 0), default=0)
    mid = max(((e, b) for e, b in ckpts if b), default=None)
    planned = cfg.get("epochs", 0) if not problem else None
    loss = None
    try:
        records, torn = MetricsLog(run, resume_epoch=None).parse()  # reads only
        if torn is not None:
            problems.append(f"metrics.jsonl line {torn} is not valid json (half-written?)")
        loss = records[-1].get("loss") if records else None
    except UserError as err:
        problems.append(str(err).replace(os.path.join(run, ""), "", 1))
    holder = run_holder(run)
    if problem:  # a resume reads config.yaml too: nothing to offer until it is repaired
        state = None
    elif holder is not None:
        state = f"running ({holder})"
    elif not ckpts:
        state = "no checkpoint (failed before its first save, or still starting)"
    elif done >= planned and not (mid and mid[0] >= done):
        state = "complete"
    else:
        where = f"epoch {mid[0]} + {mid[1]} steps" if mid and mid[0] >= done else f"epoch {done}"
        preempted = " (preempted)" if os.path.exists(os.path.join(run, PREEMPTED_MARK)) else ""
        state = f"resumable from {where}{preempted}: --log_dir {run} --train_from latest"
    number = isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss)
    width = cfg.get("width_multiplier", 1.0)
    arch = f"{cfg.get('arch', '?')}" + (f" x{width:g}" if isinstance(width, (int, float)) and width != 1 else "")
    return {"run": run, "method": cfg.get("clr", "?"), "dataset": cfg.get("dataset_name", "?"), "arch": arch,
            "batch": cfg.get("batch_size", "?"), "epochs": f"{done}/{'?' if planned is None else planned}",
            "loss": f"{loss:.4f}" if number else "-" if loss is None else str(loss),
            "evals": ", ".join(read_evals(run)) or "-", "state": "; ".join(problems + [state] * (state is not None))}


def _cell(value) -> str:
    """A value as one markdown table cell (no line breaks, no column bars)."""
    return " ".join(str(value).split()).replace("|", "\\|")


def print_summary(path: str) -> list[dict]:
    rows = [describe_run(run) for run in find_runs(path)]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(_cell(row[k]) for k in COLUMNS) + " |")
    return rows
