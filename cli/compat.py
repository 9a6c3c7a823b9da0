"""Other repositories' spellings, in one place: each is an alias of exactly one flag of this tool or a
translation onto its flags, applied before the settings are checked. ``--help`` leaves them out;
``--help-all`` and docs/compatibility.md list them with what each maps to.

- FlatCLR's README commands: ``--x=True/False`` booleans (every boolean takes them), ``--train_mode ssl``,
  ``--model``.
- UnsupervisedLearningCodes (seed 001): ``--network``, ``--mlpbn``, ``--loss insd``, ``--t``, ``--exp``, and
  ``--cudaenv``/``--gpus`` (accepted, not used).
- MetaContrastive (seed 002): ``--multiplier``, ``--rottlr``, ``--rottlr_p``, ``--adpt``, ``--eval_freq``,
  ``--save_freq``, ``--log_freq``, ``--run_id``, ``--encoder_ckpt``, ``--train_size``, an evaluation's
  ``--lr``/``--iters`` (the classifier's), and ``--dist_address`` (accepted, not used).
- sthalles/SimCLR (seed 004): its nested ``config.yaml`` (:func:`map_sthalles_config`).

Where a seed's meaning differs from this tool's, the tool keeps its own and says so in one line; a seed
spelling that contradicts this tool's own flag on the same command line is one error line.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from cli.options import str2bool
from common.distributed import launched_rank
from common.errors import UserError
from engine.checkpoint import list_checkpoints
from engine.runlog import runs_of
from models import ARCH_ALIASES, METHODS

# spelling -> (the flag it is, whose spelling)
ALIASES = {
    "--dataset": ("dataset_name", "FlatCLR"),
    "--model": ("arch", "FlatCLR"),
    "--t": ("temperature", "UnsupervisedLearningCodes"),
    "--exp": ("log_dir", "UnsupervisedLearningCodes"),
    "--multiplier": ("n_views", "MetaContrastive"),
    "--rottlr": ("rot_pred_weight", "MetaContrastive"),
    "--rottlr_p": ("rot_task_p", "MetaContrastive"),
    "--adpt": ("rot_pred_decay", "MetaContrastive"),
    "--eval_freq": ("eval_every_n_steps", "MetaContrastive"),
    "--save_freq": ("save_every_n_steps", "MetaContrastive"),
    "--log_freq": ("log_every_n_steps", "MetaContrastive"),
}
# Seed 001's --network values: (our --arch, CIFAR stem).
ULC_NETWORKS = {f"resnet{d}{suffix}": (f"resnet{d}", suffix == "_cifar") for d in (18, 34, 50, 101, 152)
                for suffix in ("", "_cifar")}
# Flags that exist only as other tools' spellings: (help, add_argument keywords).
SEED_FLAGS = {
    "--network": ("UnsupervisedLearningCodes: resnetNN_cifar = --arch resnetNN --cifar_stem; resnetNN = --arch "
                  "resnetNN --no-cifar_stem", {"choices": sorted(ULC_NETWORKS)}),
    "--mlpbn": ("UnsupervisedLearningCodes: = --proj_bn (1) / --no-proj_bn (0)", {"type": int, "choices": [0, 1]}),
    "--cudaenv": ("UnsupervisedLearningCodes: accepted and not used: choose devices with CUDA_VISIBLE_DEVICES and "
                  "torchrun", {}),
    "--gpus": ("UnsupervisedLearningCodes: accepted and not used: choose devices with CUDA_VISIBLE_DEVICES and "
               "torchrun", {}),
    "--run_id": ("MetaContrastive: pretraining: the run directory's name, results/<dataset>/<bs>_<Method>/<run_id>, "
                 "instead of the date", {}),
    "--dist_address": ("MetaContrastive: accepted and not used: torchrun sets the address (--rdzv_endpoint, or "
                       "MASTER_ADDR/MASTER_PORT)", {}),
    "--encoder_ckpt": ("MetaContrastive: eval mode: the checkpoint file to evaluate (= --checkpoint_dir its "
                       "directory, --transfer_from_epoch its epoch)", {}),
    "--train_size": ("MetaContrastive: eval mode: percent of the labels (1 or 10; -1: all) = --semi_ratio 0.01 or "
                     "0.1", {"type": float}),
}


def add_compat_flags(parser: argparse.ArgumentParser, show: bool) -> None:
    """The aliases (each copying its flag's type and choices) and the seed-only flags, in one group that only
    ``--help-all`` (``show``) lists."""
    g = parser.add_argument_group("other tools' spellings, mapped onto the flags above (see "
                                  "docs/compatibility.md)")
    for spelling, (dest, seed) in ALIASES.items():
        target = next(a for a in parser._actions if a.dest == dest and a.option_strings[0] == f"--{dest}")
        extra = {"nargs": target.nargs, "const": target.const} if target.nargs == "?" else {}
        g.add_argument(spelling, dest=dest, type=target.type, choices=target.choices, default=argparse.SUPPRESS,
                       help=f"= --{dest} ({seed}'s spelling)" if show else argparse.SUPPRESS, **extra)
    for flag, (text, keywords) in SEED_FLAGS.items():
        g.add_argument(flag, default=None, help=text if show else argparse.SUPPRESS, **keywords)


def translate(cfg: argparse.Namespace, explicit: set[str]) -> None:
    """Every seed spelling onto this tool's settings (before they are checked)."""
    map_seed_spellings(cfg, explicit)
    if cfg.train_mode == "ssl":  # FlatCLR's name for pretraining
        cfg.train_mode = "pretrain"
    cfg.arch = ARCH_ALIASES.get(cfg.arch, cfg.arch)
    if cfg.fp16_precision:  # FlatCLR's switch
        cfg.precision = "fp16"



def map_seed_spellings(cfg: argparse.Namespace, explicit: set[str]) -> None:
    """Seed 001's --network, --mlpbn, --loss onto this tool's flags (a contradiction is one line), and a note
    for its --cudaenv/--gpus."""
    if cfg.network is not None:
        arch, stem = ULC_NETWORKS[cfg.network]
        given = {"arch": ARCH_ALIASES.get(cfg.arch, cfg.arch), "cifar_stem": cfg.cifar_stem}
        for key, value in (("arch", arch), ("cifar_stem", stem)):
            if key in explicit and given[key] != value:
                raise UserError(f"--network {cfg.network} means --{key}={value}, not {given[key]}; pass one of them")
            setattr(cfg, key, value)
    if cfg.mlpbn is not None:
        if "proj_bn" in explicit and cfg.proj_bn != bool(cfg.mlpbn):
            raise UserError(f"--mlpbn {cfg.mlpbn} contradicts --proj_bn={cfg.proj_bn}; pass one of them")
        cfg.proj_bn = bool(cfg.mlpbn)
    if cfg.loss == "insd":
        if cfg.clr != "insdis":
            raise UserError(f"--loss insd is InsDis's loss, not {cfg.clr}'s; pass --clr insdis")
        if "insdis_loss" in explicit and cfg.insdis_loss != "softmax":
            raise UserError(f"--loss insd is --insdis_loss softmax, not {cfg.insdis_loss}; pass one of them")
        cfg.insdis_loss = "softmax"
    map_meta_spellings(cfg, explicit)
    if (cfg.cudaenv is not None or cfg.gpus is not None) and launched_rank() == 0:
        print("note: --cudaenv/--gpus are accepted for seed 001's commands and not used: choose devices with "
              "CUDA_VISIBLE_DEVICES and run several with torchrun --nproc_per_node", file=sys.stderr)


def run_id_dir(cfg: argparse.Namespace) -> None:
    """Seed 002's --run_id: the run directory results/<dataset>/<bs>_<Method>/<run_id> (before a resume reads it)."""
    if cfg.run_id is None:
        return
    if cfg.train_mode == "eval":
        if launched_rank() == 0:
            print("note: --run_id names pretraining runs; an evaluation writes into its run's eval/ directory",
                  file=sys.stderr)
        return
    if not cfg.run_id.strip() or os.sep in cfg.run_id or cfg.run_id in (".", ".."):
        raise UserError(f"--run_id {cfg.run_id!r} is not a directory name; pass e.g. --run_id 000001")
    if cfg.log_dir is not None:
        raise UserError("--run_id and --log_dir both name the run directory; pass one of them")
    method = METHODS[cfg.clr].display_for(cfg)
    cfg.log_dir = os.path.join(runs_of(cfg.results_dir, cfg.dataset_name, cfg.batch_size, method), cfg.run_id)


def map_meta_spellings(cfg: argparse.Namespace, explicit: set[str]) -> None:
    """Seed 002's --encoder_ckpt, --train_size and --lr of its evaluation commands, and notes for --dist_address
    and for its --eval_freq/--log_freq in eval mode (a contradiction with this tool's own flag is one line)."""
    evaluating = cfg.train_mode == "eval"
    if cfg.encoder_ckpt is not None:
        if not evaluating:
            raise UserError("--encoder_ckpt is the checkpoint an evaluation reads; pass --train_mode=eval")
        path = cfg.encoder_ckpt
        run_dir = os.path.dirname(os.path.abspath(path))
        epochs = {os.path.abspath(p): e for e, p in list_checkpoints(run_dir).items()} if os.path.isdir(run_dir) else {}
        if os.path.abspath(path) not in epochs:
            raise UserError(f"--encoder_ckpt {path} is not an epoch-end checkpoint of a run of this tool "
                            "(RUN/checkpoint_NNNN.pth.tar); pass one, or --checkpoint_dir RUN")
        for key, value in (("checkpoint_dir", run_dir), ("transfer_from_epoch", epochs[os.path.abspath(path)])):
            given = getattr(cfg, key)
            if key in explicit and given is not None and (os.path.abspath(given) if key == "checkpoint_dir"
                                                         else given) != value:
                raise UserError(f"--encoder_ckpt {path} means --{key}={value}, not {given}; pass one of them")
            setattr(cfg, key, value)
    if cfg.train_size is not None:
        if not evaluating:
            raise UserError("--train_size is the share of labels an evaluation trains on; pass --train_mode=eval")
        ratio = None if cfg.train_size == -1 else cfg.train_size / 100
        if ratio is not None and not 0 < ratio < 1:
            raise UserError(f"--train_size is a percentage of the labels in (0, 100) (or -1: all), got "
                            f"{cfg.train_size:g}")
        if "semi_ratio" in explicit and cfg.semi_ratio != ratio:
            raise UserError(f"--train_size {cfg.train_size:g} means --semi_ratio {ratio}, not {cfg.semi_ratio}; pass "
                            "one of them")
        cfg.semi_ratio = ratio
    if evaluating and "lr" in explicit:  # the evaluation's own rate: the classifier's
        if "fc_lr" in explicit and cfg.fc_lr != cfg.lr:
            raise UserError(f"in eval mode --lr is the classifier's rate (--fc_lr); --lr {cfg.lr:g} and --fc_lr "
                            f"{cfg.fc_lr:g} disagree: pass one of them")
        cfg.fc_lr = cfg.lr
    if evaluating and {"eval_every_n_steps", "log_every_n_steps"} & explicit and launched_rank() == 0:
        print("note: --eval_freq/--log_freq pace pretraining; an evaluation reports its test accuracy once the "
              "classifier is trained", file=sys.stderr)
    if evaluating:  # --iters on an evaluation's command line is the classifier's length; a run's is not
        if {"iters", "fc_epochs"} <= explicit:
            raise UserError("in eval mode --iters and --fc_epochs both set the classifier's training; pass one of "
                            "them")
        if "iters" in explicit:
            if "fc_iters" in explicit and cfg.fc_iters != cfg.iters:
                raise UserError(f"in eval mode --iters is the classifier's steps (--fc_iters); --iters {cfg.iters} "
                                f"and --fc_iters {cfg.fc_iters} disagree: pass one of them")
            cfg.fc_iters = cfg.iters
        cfg.iters = None
    if cfg.dist_address is not None and launched_rank() == 0:
        print("note: --dist_address is accepted for seed 002's commands and not used: torchrun sets the address "
              "(--rdzv_endpoint, or MASTER_ADDR/MASTER_PORT)", file=sys.stderr)


# sthalles/SimCLR's config.yaml (seed 004): nested sections and top-level keys -> this tool's flags.
STHALLES_SECTIONS = ("model", "dataset", "loss")
STHALLES_KEYS = {"model.out_dim": "proj_out_dim", "model.base_model": "arch", "dataset.s": "color_jitter_strength",
                 "dataset.input_shape": "image_size", "dataset.num_workers": "workers",
                 "dataset.valid_size": "valid_size", "loss.temperature": "temperature",
                 "loss.use_cosine_similarity": "similarity", "fp16_precision": "precision",
                 "eval_every_n_epochs": "valid_every_n_epochs", "fine_tune_from": "from_pretrained"}


def map_sthalles_config(values: dict, path: str) -> dict:
    """sthalles/SimCLR's nested config.yaml as this tool's flags (its method, SimCLR, unless the file says
    otherwise); keys without a meaning here are named in one warning line, a fine_tune_from that names no run
    here in another (then the run starts from scratch, as the original does)."""
    flat: dict = {}
    for key, value in values.items():
        if key in STHALLES_SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    out, ignored = {"clr": "simclr"}, []
    for key, value in flat.items():
        target = STHALLES_KEYS.get(key, key if "." not in key else None)
        if target is None:
            ignored.append(key)
        elif target == "image_size":
            out[target] = sthalles_image_size(value, path)
        elif target == "similarity":
            out[target] = "cosine" if sthalles_bool(value, key, path) else "dot"
        elif target == "precision":
            if sthalles_bool(value, key, path):
                out[target] = "fp16"
        elif target == "from_pretrained":
            if value and os.path.exists(str(value)):
                out[target] = str(value)
            elif value and launched_rank() == 0:
                print(f"warning: {path}: fine_tune_from {value!r} names no run or checkpoint here; training from "
                      "scratch, as sthalles/SimCLR does (--from_pretrained PATH is the strict form)", file=sys.stderr)
        else:
            out[target] = value
    if ignored and launched_rank() == 0:
        print(f"warning: {path}: {', '.join(ignored)} mean nothing here and are ignored", file=sys.stderr)
    return out


def sthalles_bool(value, key: str, path: str) -> bool:
    """A sthalles/SimCLR switch: a yaml boolean, or the strings the command line takes ("False" is False)."""
    if isinstance(value, bool):
        return value
    try:
        return str2bool(str(value))
    except argparse.ArgumentTypeError:
        raise UserError(f"{path}: {key}: expected true or false, got {value!r}") from None


def sthalles_image_size(value, path: str) -> int:
    """The side of sthalles/SimCLR's ``dataset.input_shape``, channels first ``(3,96,96)`` or last
    ``(96,96,3)``; a non-square or ambiguous shape is one line."""
    sizes = [int(v) for v in re.findall(r"\d+", str(value))]
    channels = (1, 3)
    if len(sizes) == 3 and sizes[-1] in channels and sizes[0] not in channels:
        sizes = sizes[:2]
    elif len(sizes) == 3 and sizes[0] in channels and sizes[-1] not in channels:
        sizes = sizes[1:]
    if len(sizes) != 2 or sizes[0] != sizes[1]:
        raise UserError(f"{path}: dataset.input_shape {value!r} is not a square image shape like (96,96,3) or "
                        "(3,96,96); write it as one of those")
    return sizes[0]


