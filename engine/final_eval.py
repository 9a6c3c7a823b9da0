"""``--final_eval``: when pretraining reaches ``--epochs``, the last checkpoint evaluated with each protocol into
``RUN/eval/`` (as ``--train_mode eval`` would), with a random-init baseline beside it on request."""
from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import json
import os
import shutil

from common.distributed import broadcast_object, launched_rank
from common.errors import Preempted
from common.settings import derive
from engine.checkpoint import list_checkpoints
from engine.evaluate import eval_defaults, evaluate
from engine.records import PARTIAL, measured_data, record_path
from engine.pretrain import pretrain
from engine.rundir import PREEMPTED_MARK
from engine.runlog import write_json


def pretrain_then_evaluate(cfg: argparse.Namespace, held: list, resume_path: str | None) -> None:
    """Pretraining, then ``--final_eval`` when it finished (or, on a resume, the evaluations still missing).
    ``held`` is ``[the resumed checkpoint or None]``: popped, so that pretraining holds the only reference to
    the mapped file and lets it go once restored (retention may delete it; its space is then freed)."""
    resumed = held[0] is not None
    run_dir, finished, cfg = pretrain(cfg, held.pop(), resume_path)
    if cfg.final_eval and (finished or resumed):
        final_evaluations(cfg, run_dir, only_missing=not finished)


def final_evaluations(cfg: argparse.Namespace, run_dir: str, only_missing: bool = False) -> None:
    """``--final_eval``: each protocol on the run's last checkpoint (and a random-init baseline with
    ``--final_eval_baseline``), then one summary line per protocol. ``only_missing`` (a resume): the
    protocols whose record is not written yet, an interrupted fine-tuning continuing from its saved position;
    nothing when all are written."""
    epoch = max(list_checkpoints(run_dir))
    if epoch < cfg.epochs:  # the run has not reached --epochs (--stop_after_epoch)
        return
    mark = os.path.join(run_dir, PREEMPTED_MARK)
    if os.path.exists(mark) and launched_rank() == 0:
        os.remove(mark)  # this invocation continues what the mark stood for
    lines, below = [], []
    for protocol in cfg.final_eval:
        ev = derive(cfg, train_mode="eval", checkpoint_dir=run_dir, eval_all=False, transfer_mode=protocol,
                    transfer_from_epoch=epoch, train_from=None, eval_dir=None)
        path_of = functools.partial(record_path, os.path.join(run_dir, "eval"), protocol, cfg.semi_ratio, epoch)
        if only_missing and os.path.isfile(path_of()):
            continue
        if os.path.isfile(path_of(PARTIAL)):
            ev = derive(ev, train_from="latest")
        ev = eval_defaults(ev)
        try:
            record = evaluate(ev)[-1]
        except Preempted as stop:  # the job script requeues on the mark; the resume finishes this evaluation
            if launched_rank() == 0:
                with open(mark, "w") as f:
                    f.write(f"{stop}\n")
            raise Preempted(f"{str(stop).split('; continue')[0]}; continue with --log_dir {run_dir} "
                            "--train_from latest") from stop
        line = f"{protocol}: top-1 {record['top1']:.2f}% (epoch {epoch})"
        if cfg.final_eval_baseline:
            baseline = random_init_record(ev, os.path.join(run_dir, "eval", "random_init"))
            line += (f", random init {baseline['top1']:.2f}% ({record['top1'] - baseline['top1']:+.2f} points from "
                     "pretraining)")
        lines.append(line)
        if cfg.final_eval_baseline and record["top1"] < baseline["top1"]:
            below.append(protocol)
    if lines and launched_rank() == 0:
        pictures = [p for p in [os.path.join(run_dir, "curves.png")] + sorted(glob.glob(os.path.join(
            glob.escape(run_dir), "eval", f"tsne_*_epoch{epoch:04d}.png"))) if os.path.isfile(p)]
        print("final evaluation of " + run_dir + ":\n  " + "\n  ".join(lines)
              + (f"\npictures: {', '.join(pictures)}" if pictures else ""), flush=True)
        if below:
            print(f"warning: {', '.join(below)} ended below the random-init baseline: this pretraining did not help; "
                  "usually the run is too short or its lr too high for its batch and width (try more --epochs, "
                  "--learning_rate_scaling sqrt or a lower --lr; curves.png shows whether the loss fell)", flush=True)


# What changes a random-init baseline's result; with the cache's version, its key. A change to how evaluation
# computes a result bumps BASELINE_VERSION, so that no older baseline is reused.
BASELINE_SETTINGS = ("dataset_name", "image_size", "arch", "cifar_stem", "width_multiplier", "transfer_mode",
                     "fc_epochs", "fc_iters", "fc_batch_size", "fc_micro_batch_size", "fc_lr", "fc_optimizer",
                     "fc_weight_decay", "fc_momentum", "fc_scheduler", "fc_augment", "knn_k", "knn_temperature",
                     "logistic_max_iter", "semi_ratio", "eval_train_subset", "subset_seed", "seed")
BASELINE_VERSION = 1


def baseline_key(ev: argparse.Namespace) -> str:
    """The name of a random-init baseline in the cache: a digest of every setting that changes its result."""
    values = {k: getattr(ev, k) for k in BASELINE_SETTINGS}
    values["data_root"] = measured_data(ev)["data_root"]
    given = getattr(ev, "sources", None) or {}  # a default classifier batch may be lowered, a given one is not
    values["given"] = sorted(k for k in ("fc_batch_size", "fc_lr") if k in given)
    values["version"] = BASELINE_VERSION
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{ev.dataset_name}-{ev.arch}-{ev.transfer_mode}-{digest}"


def random_init_record(ev: argparse.Namespace, out_dir: str) -> dict:
    """The random-init baseline of evaluation ``ev``, written into ``out_dir`` (``RUN/eval/random_init``): taken
    from ``<results_dir>/baselines/`` when one with the same settings was computed before, else computed there
    and kept for the next run."""
    cache = os.path.join(ev.results_dir, "baselines", baseline_key(ev) + ".json")
    record = None
    if launched_rank() == 0:  # one reader decides for every rank, so that all of them evaluate or none
        try:
            with open(cache, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = None
    record = broadcast_object(record)
    if isinstance(record, dict) and isinstance(record.get("top1"), (int, float)):
        if launched_rank() == 0:
            os.makedirs(out_dir, exist_ok=True)
            shutil.copyfile(cache, record_path(out_dir, ev.transfer_mode, ev.semi_ratio, 0))
            print(f"random init: {record['top1']:.2f}% (the same baseline as {cache})", flush=True)
        return record
    record = evaluate(derive(ev, checkpoint_dir="none", transfer_from_epoch=None, train_from=None,
                             eval_dir=out_dir))[-1]
    if launched_rank() == 0:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        write_json(cache, record)
    return record
