"""Where an evaluation's results go and what they say they measured: the json record's name
(``RUN/eval/<mode>[_semi<ratio>][_<data tag>]_epoch<N>.json``), the data it measured, and the data tag that
keeps an evaluation on other data than the run's own apart."""
from __future__ import annotations

import hashlib
import json
import os
import re
from argparse import Namespace

from common.errors import UserError
from common.yamlfile import read_mapping
from data.datasets import Split, data_root


# --checkpoint_dir values that name a baseline instead of a run: a random-init backbone, or PCA of the raw pixels
# (sthalles/SimCLR's "PCA Features" rows).
BASELINES = ("none", "pca")


def trains_through(cfg: Namespace) -> bool:
    """Whether the evaluation trains through the backbone (and so saves a position on a signal)."""
    return cfg.transfer_mode == "finetune" or (cfg.transfer_mode == "linear_eval" and bool(cfg.fc_augment))


def partial_path(out_dir: str, cfg: Namespace, epoch: int) -> str:
    """Where a fit of checkpoint ``epoch`` saves its position (removed once its result is written)."""
    return record_path(out_dir, cfg.transfer_mode, cfg.semi_ratio, epoch, PARTIAL, data=records_data_tag(cfg))


def record_tag(transfer_mode: str, semi_ratio: float | None, data: str | None = None) -> str:
    """The name of an evaluation's records: ``<mode>[_semi<ratio>][_<data tag>]`` (its json is
    ``<tag>_epoch<N>.json``); the data tag only for an evaluation on other data than its run's."""
    return f"{transfer_mode}{'' if semi_ratio is None else f'_semi{semi_ratio:g}'}{'' if data is None else f'_{data}'}"


def record_path(out_dir: str, transfer_mode: str, semi_ratio: float | None, epoch: int,
                suffix: str = ".json", data: str | None = None) -> str:
    """``<out_dir>/<tag>_epoch<N><suffix>``: an evaluation's json record, or with ``PARTIAL`` the saved
    position of its fit (what --final_eval and the sweeps look for too: the run's own data, ``data`` None)."""
    return os.path.join(out_dir, f"{record_tag(transfer_mode, semi_ratio, data)}_epoch{epoch:04d}{suffix}")


PARTIAL = ".partial.pth.tar"


def measured_data(cfg: Namespace) -> dict:
    """What an evaluation measures, as its record says it: the dataset and the absolute data root (None for a
    dataset that reads no file, such as digits)."""
    return {"dataset": cfg.dataset_name, "data_root": data_root(cfg.dataset_name, cfg.data)}


def same_data(a: dict, b: dict) -> bool:
    """Whether two records (or a run's settings as ``measured_data``) measured the same data: the same dataset
    and data root, compared as real paths. A record from before data roots were recorded: its dataset alone."""
    if a.get("dataset") != b.get("dataset"):
        return False
    if "data_root" not in a or "data_root" not in b:
        return True
    roots = a["data_root"], b["data_root"]
    if not all(isinstance(r, str) for r in roots):  # None: a dataset that reads no file
        return roots[0] == roots[1]
    return os.path.realpath(roots[0]) == os.path.realpath(roots[1])


def data_tag(dataset: str, root: str | None) -> str:
    """``<dataset>[-<folder name>-<6 hex digits of the root's real path>]``: names the data of an evaluation in
    the names of its files, when that is not its run's own data."""
    if root is None:
        return dataset
    real = os.path.realpath(root)
    folder = re.sub(r"[^A-Za-z0-9.-]+", "-", os.path.basename(real.rstrip(os.sep)) or "root")[:24]
    return f"{dataset}-{folder}-{hashlib.sha1(real.encode()).hexdigest()[:6]}"


def _run_data(run_dir: str) -> dict | None:
    """The data a run was pretrained on (its config.yaml's dataset_name and data), None when unknown."""
    try:
        saved = read_mapping(os.path.join(run_dir, "config.yaml"), "config.yaml")
    except UserError:
        return None
    if not all(isinstance(saved.get(k), str) for k in ("dataset_name", "data")):
        return None
    return measured_data(Namespace(dataset_name=saved["dataset_name"], data=saved["data"]))


def records_data_tag(cfg: Namespace) -> str | None:
    """The data tag in the names of the files an evaluation writes (records, t-SNE, accuracy plot, label subset,
    a fit's saved position): None -- the plain names that --final_eval, the sweeps and summaries read -- when it
    measures its run's own data (the dataset and data root in the run's config.yaml, which an evaluation inherits
    without --dataset_name/--data), and for a baseline or a run without config.yaml; else ``data_tag`` of its
    data, so that evaluating a run on other data (transfer) keeps its own-data records and vice versa."""
    if cfg.checkpoint_dir.lower() in BASELINES:
        return None
    run, mine = _run_data(cfg.checkpoint_dir), measured_data(cfg)
    return None if run is None or same_data(run, mine) else data_tag(mine["dataset"], mine["data_root"])


def record_file(cfg: Namespace, record: dict, out_dir: str) -> str:
    """Where ``record`` is written: ``record_path`` with ``records_data_tag``. A record already there that
    measured other data (a record of an older version, or of a run whose config.yaml is missing) is never
    overwritten: the new one goes under its own data's tag. A record of the same data is replaced, as a rerun
    should."""
    epoch = record["checkpoint_epoch"]
    path = record_path(out_dir, cfg.transfer_mode, cfg.semi_ratio, epoch, data=records_data_tag(cfg))
    try:
        with open(path, encoding="utf-8") as f:
            there = json.load(f)
    except (OSError, ValueError):  # none there (or not a record): written as before
        return path
    if isinstance(there, dict) and not same_data(there, record):
        path = record_path(out_dir, cfg.transfer_mode, cfg.semi_ratio, epoch,
                           data=data_tag(record["dataset"], record["data_root"]))
    return path


def mode_tag(cfg: Namespace) -> str:
    """``<mode>[_<data tag>]``: the name of an evaluation's t-SNE and accuracy-against-epoch files."""
    return record_tag(cfg.transfer_mode, None, records_data_tag(cfg))


def class_names(split: Split) -> list[str]:
    ds = split.dataset
    names = getattr(ds, "classes", None)
    return list(names) if names else [str(c) for c in range(split.num_classes)]

