"""Command line for contrastive self-supervised learning (SimCLR, FlatCLR, BYOL, InsDis).

Builds the parser, applies ``--config`` yaml as defaults (the command line wins), merges a resumed
run's saved settings, validates, and dispatches. Launch with ``python main.py`` or
``torchrun --nproc_per_node=N main.py``; see README.md.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys

import torch
import yaml

from common.distributed import cleanup, launched_rank
from common import provenance
from common.errors import EXIT_PREEMPTED, Preempted, UserError, worker_message
from data.datasets import DATASETS
from engine.checkpoint import list_checkpoints, load_checkpoint, load_latest, resolve_checkpoint
from engine.evaluate import PARTIAL, PROTOCOLS, evaluate, record_path
from engine.export import export_run
from engine.summary import print_summary
from engine.optim import default_lr
from engine.pretrain import PREEMPTED_MARK, pretrain
from engine.runlog import PER_INVOCATION_KEYS
from models import ARCH_ALIASES, BACKBONES, METHODS
from models.methods import Flag

TRUE, FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}

# Settings that define what a run *is*: a resumed run keeps them, and a flag that changes one is an error.
# Each method adds its own (MethodSpec.identity).
IDENTITY_KEYS = ("dataset_name", "clr", "arch", "proj_head_mode", "num_proj_layers", "proj_hidden_dim",
                 "proj_out_dim", "proj_bn", "proj_out_bn", "proj_out_bn_affine", "n_views", "cifar_stem",
                 "width_multiplier", "image_size", "optimizer", "rot_pred_weight")
# What an evaluation takes from the run it evaluates, unless given on the command line.
EVAL_INHERITED_KEYS = ("dataset_name", "data", "image_size", "arch")


def str2bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False, 1/0), got {value!r}")


def add_bool(group, name: str, default: bool | None, help: str, aliases: tuple[str, ...] = ()) -> None:
    """``--name``, ``--name=True/False/1/0`` and ``--no-name``; ``None`` default means 'auto'."""
    group.add_argument(f"--{name}", *(f"--{a}" for a in aliases), dest=name, type=str2bool, nargs="?", const=True,
                       default=default, help=help)
    group.add_argument(f"--no-{name}", dest=name, action="store_false", help=argparse.SUPPRESS)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line "error: ...", exit status 2, no usage dump (main reports it)
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="main.py", description="Contrastive self-supervised pretraining (FlatCLR family).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", default=None, help="yaml file of defaults (keys = flag names); flags win")

    g = p.add_argument_group("mode")
    g.add_argument("--train_mode", default="pretrain", choices=["pretrain", "ssl", "eval", "export", "summary"],
                   help="pretrain (FlatCLR's 'ssl' is accepted), eval (see --transfer_mode), export (a run's "
                        "backbone as a plain state dict + json in RUN/export), or summary (where the runs in "
                        "--checkpoint_dir stand)")
    g.add_argument("--clr", default="flatclr", choices=list(METHODS),
                   help="method: " + "; ".join(f"{k} ({s.display}: {s.summary})" for k, s in METHODS.items()))

    g = p.add_argument_group("data")
    g.add_argument("--data", default="./datasets", help="dataset root")
    g.add_argument("--dataset_name", "--dataset", dest="dataset_name", default="cifar10", choices=list(DATASETS))
    add_bool(g, "download", False, "download the torchvision datasets into --data if missing")
    g.add_argument("--image_size", type=int, default=None, help="crop size (default: the dataset's)")
    g.add_argument("--n_views", "--multiplier", dest="n_views", type=int, default=None,
                   help="augmented views per image (default 2; with --head PN/R2D2, --n_supp + --n_query; "
                        "--multiplier: MetaContrastive's spelling)")
    g.add_argument("--workers", type=int, default=8, help="DataLoader worker processes per rank")
    g.add_argument("--color_jitter_strength", type=float, default=None,
                   help="SimCLR colour strength s (default 0.5 for <=64 px images, else 1.0)")
    g.add_argument("--min_crop_scale", type=float, default=0.08, help="lower bound of the crop area")
    add_bool(g, "blur", None, "Gaussian blur in the views (default: on for images of 96 px or more)")
    add_bool(g, "skip_bad_images", False, "replace an unreadable image of a folder dataset by the next readable "
                                          "one (pretraining, evaluation) or leave it out (--faster_version)")
    g.add_argument("--rot_task_p", "--rottlr_p", dest="rot_task_p", type=float, default=0.0,
                   help="rotation as task augmentation (MetaContrastive): each image picked with this probability "
                        "has all its views turned by one k*90 degrees, k uniform in {0,1,2,3} as the authors' code "
                        "(so 3p/4 are turned); --rottlr_p: their spelling")
    add_bool(g, "faster_version", False, "dataset held as uint8 on the training device, views made there in "
                                         "batches with per-sample parameters (in-memory datasets)")
    g.add_argument("--input_pipeline", default="standard", choices=["standard", "hybrid"],
                   help="hybrid: workers decode, crop and flip (uint8 out), colour jitter, grayscale, blur, solarize "
                        "and normalisation run batched on the training device (the ImageNet presets' choice)")
    add_bool(g, "decode_on_gpu", False, "hybrid pipeline whose workers only read the files: JPEGs decoded in "
                                        "batches on the GPU (on the CPU without one), then cropped there")

    g = p.add_argument_group("model")
    g.add_argument("--model", "--arch", dest="arch", default="resnet50", type=str.lower,
                   choices=list(BACKBONES) + list(ARCH_ALIASES), help="ResNet backbone (any case: MetaContrastive's "
                                                                      "ResNet50 is resnet50)")
    add_bool(g, "cifar_stem", None, "3x3 stride-1 stem without max-pool (default: images <= 64 px)")
    g.add_argument("--width_multiplier", type=float, default=1.0,
                   help="channel widths x this (0.25: 16-32-64-128, feature dim 128 for resnet18); 1.0 is "
                        "torchvision's ResNet")
    g.add_argument("--proj_head_mode", default="nonlinear", choices=["nonlinear", "linear", "none"])
    g.add_argument("--num_proj_layers", type=int, default=2, help="Linear layers in the nonlinear head")
    g.add_argument("--proj_hidden_dim", type=int, default=None, help="default: the backbone's feature dim")
    g.add_argument("--proj_out_dim", type=int, default=128)
    add_bool(g, "proj_bn", True, "BN in the projection's hidden layers (BN1 of the seed-001 ablation)")
    add_bool(g, "proj_out_bn", False, "BN on the projection output (BN3)")
    add_bool(g, "proj_out_bn_affine", True, "affine parameters of that output BN")
    g = p.add_argument_group("seed 001 (UnsupervisedLearningCodes) spellings, mapped onto the flags above")
    g.add_argument("--network", default=None, choices=sorted(ULC_NETWORKS),
                   help="resnetNN_cifar = --arch resnetNN --cifar_stem; resnetNN = --arch resnetNN --no-cifar_stem")
    g.add_argument("--mlpbn", type=int, default=None, choices=[0, 1], help="= --proj_bn (1) / --no-proj_bn (0)")
    g.add_argument("--loss", default=None, choices=["insd"],
                   help="insd = InsDis's non-parametric softmax over the memory bank (--clr insdis "
                        "--insdis_loss softmax)")
    for name in ("--cudaenv", "--gpus"):
        g.add_argument(name, default=None, help="accepted and not used: choose devices with CUDA_VISIBLE_DEVICES "
                                                "and torchrun")
    g = p.add_argument_group("seed 002 (MetaContrastive) spellings, mapped onto the flags of this tool "
                             "(also --multiplier, --arch ResNet50, --iters, --eval_freq, --save_freq, --log_freq, "
                             "--rottlr, --rottlr_p, --adpt)")
    g.add_argument("--run_id", default=None, help="pretraining: the run directory's name, results/<dataset>/"
                                                  "<bs>_<Method>/<run_id>, instead of the date")
    g.add_argument("--dist_address", default=None, help="accepted and not used: torchrun sets the address "
                                                        "(--rdzv_endpoint, or MASTER_ADDR/MASTER_PORT)")
    g.add_argument("--encoder_ckpt", default=None,
                   help="eval mode: the checkpoint file to evaluate (= --checkpoint_dir its directory, "
                        "--transfer_from_epoch its epoch)")
    g.add_argument("--train_size", type=float, default=None,
                   help="eval mode: percent of the labels (1 or 10; -1: all) = --semi_ratio 0.01 or 0.1")

    g = p.add_argument_group("objective")
    g.add_argument("--temperature", "--t", dest="temperature", type=float, default=0.1,
                   help="SimCLR/FlatCLR/InsDis temperature (--t: seed 001's spelling)")
    g.add_argument("--rot_pred_weight", "--rottlr", dest="rot_pred_weight", type=float, default=0.0,
                   help="auxiliary rotation prediction (MetaContrastive): a linear 4-way head on the projections "
                        "predicts each view's random rotation in a second forward; this weight x its cross-entropy "
                        "is added (0: off; --rottlr: the authors' spelling)")
    add_bool(g, "rot_pred_decay", False, "decay --rot_pred_weight along a cosine to 0 over the run (the authors' "
                                         "--adpt)", aliases=("adpt",))
    add_method_flags(p)

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=512, help="global batch size (all ranks)")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--iters", type=int, default=None,
                   help="optimizer steps in all, instead of --epochs (MetaContrastive's spelling): the run has "
                        "ceil(iters / steps an epoch) epochs, the last one cut at step iters; the schedule ends there")
    g.add_argument("--accu_iter", type=int, default=1,
                   help="split each step's batch into this many micro-batches, forward and backward one at a time "
                        "(less memory; losses averaged, one gradient all-reduce a step); contrastive negatives "
                        "and BN statistics stay within a micro-batch")
    g.add_argument("--lr", type=float, default=None,
                   help="base lr, scaled by --learning_rate_scaling (default for lars/sgd: 0.3 with linear "
                        "or none, 0.075 with sqrt, as FlatCLR's README; 1e-3 for adamw)")
    g.add_argument("--learning_rate_scaling", default="linear", choices=["linear", "sqrt", "none"],
                   help="lr = base*bs/256 (linear), base*sqrt(bs) (sqrt) or base (none)")
    g.add_argument("--optimizer", default="lars", choices=["lars", "sgd", "adamw"])
    g.add_argument("--weight_decay", type=float, default=1e-6)
    add_bool(g, "wd_bias_and_norm", False, "also decay biases and normalisation parameters (default: only "
                                           "weights, as SimCLR; other libraries decay all under SGD)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--warmup_epochs", type=int, default=10,
                   help="linear warmup; one as long as the run or longer is capped at 10%% of the run's steps")
    add_bool(g, "cap_warmup", True, "apply that cap (--no-cap_warmup keeps the full --warmup_epochs)")
    g.add_argument("--scheduler", default="cosine", choices=["cosine", "constant"])
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    add_bool(g, "fp16_precision", False, "FlatCLR's switch: same as --precision fp16")
    add_bool(g, "sync_bn", None, "SyncBatchNorm across ranks (default: on for multi-GPU)")
    add_bool(g, "channels_last", True, "NHWC memory format: faster ResNet steps on CUDA and on the CPU")
    add_bool(g, "compile", False, "torch.compile the model")

    g = p.add_argument_group("evaluation (--train_mode=eval)")
    g.add_argument("--transfer_mode", default="linear_eval", choices=list(PROTOCOLS))
    g.add_argument("--checkpoint_dir", default=None,
                   help="pretraining run directory to evaluate; 'none' for a random-init baseline, 'pca' for PCA of "
                        "the raw pixels (--pca_dim components)")
    g.add_argument("--pca_dim", type=int, default=256, help="components of the --checkpoint_dir pca baseline")
    g.add_argument("--logistic_max_iter", type=int, default=1000,
                   help="L-BFGS iterations of --transfer_mode logistic (scikit-learn, C=1, standardised features)")
    g.add_argument("--transfer_from_epoch", type=int, default=None, help="checkpoint epoch (default: the last)")
    add_bool(g, "eval_all", False, "evaluate every checkpoint and plot accuracy against epoch")
    g.add_argument("--fc_epochs", type=int, default=100, help="epochs of linear eval / fine-tuning")
    g.add_argument("--fc_batch_size", type=int, default=4096,
                   help="global batch of linear eval / fine-tuning (one optimizer step; SimCLR's 4096)")
    g.add_argument("--fc_micro_batch_size", type=int, default=None,
                   help="per-device images per forward/backward when training through the backbone (finetune, "
                        "--fc_augment); --fc_batch_size is reached by accumulating them (default: 256 for "
                        "finetune, 1024 for --fc_augment linear eval)")
    g.add_argument("--fc_lr", type=float, default=None,
                   help="lr (default 0.1*fc_batch_size/256 for linear_eval, 0.05*fc_batch_size/256 for finetune)")
    g.add_argument("--fc_optimizer", default="sgd", choices=["sgd", "lars", "adamw"])
    g.add_argument("--fc_weight_decay", type=float, default=0.0)
    g.add_argument("--fc_momentum", type=float, default=0.9)
    g.add_argument("--fc_scheduler", default="cosine", choices=["cosine", "constant"])
    add_bool(g, "fc_augment", False, "linear eval through the frozen backbone on augmented images "
                                     "(default: train on cached features, much faster)")
    g.add_argument("--semi_ratio", type=float, default=None,
                   help="train on this class-balanced fraction of the labels (e.g. 0.01, 0.1)")
    g.add_argument("--knn_k", type=int, default=200)
    g.add_argument("--knn_temperature", type=float, default=0.1)
    add_bool(g, "tsne", True, "write a t-SNE PNG of the test features and a TensorBoard projector embedding")
    g.add_argument("--tsne_layer", default="backbone", choices=["backbone", "projection"],
                   help="which features the t-SNE draws: the last conv layer's (backbone) or the projection "
                        "head's output (seed 001 draws both); experiments/tsne_compare.py sets runs side by side")
    g.add_argument("--eval_every_n_epochs", type=int, default=0,
                   help="during pretraining: kNN accuracy on the test split every K epochs (0: off)")
    g.add_argument("--valid_size", type=float, default=0.0,
                   help="hold out this fraction of the pretraining images and log the contrastive top-1/top-5 "
                        "(is the positive the highest logit) and loss on them (sthalles/SimCLR's valid_size; 0: off)")
    g.add_argument("--valid_every_n_epochs", type=int, default=1, help="how often that held-out check runs")
    g.add_argument("--eval_every_n_steps", "--eval_freq", dest="eval_every_n_steps", type=int, default=0,
                   help="during pretraining: kNN accuracy on the test split every N steps, to TensorBoard and the "
                        "output (0: off; --eval_freq: MetaContrastive's spelling)")

    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--results_dir", default="results", help="root of new run directories")
    g.add_argument("--log_dir", "--exp", dest="log_dir", default=None,
                   help="run directory (to resume, or to name a new run); --exp: seed 001's spelling")
    g.add_argument("--from_pretrained", default=None,
                   help="start a new pretraining run from the backbone of another run (its directory, a checkpoint "
                        "or an export); --train_from resumes the same run instead")
    add_bool(g, "from_pretrained_head", False, "with --from_pretrained, also take its projection head")
    g.add_argument("--train_from", default=None,
                   help="checkpoint to resume from: a file in --log_dir, a path, or 'latest'; in eval mode "
                        "'latest' continues an interrupted finetune / --fc_augment linear eval")
    g.add_argument("--save_every_n_epochs", type=int, default=2)
    g.add_argument("--save_every_n_steps", "--save_freq", dest="save_every_n_steps", type=int, default=0,
                   help="also save mid-epoch every N steps (0: off); SIGTERM/SIGUSR1 always save and stop")
    g.add_argument("--save_every_n_minutes", type=float, default=0.0, help="also save mid-epoch every M minutes")
    g.add_argument("--keep_mid_epoch_checkpoints", type=int, default=2,
                   help="mid-epoch checkpoints kept (none older than the last epoch-end one)")
    g.add_argument("--keep_checkpoints", type=int, default=3,
                   help="epoch-end checkpoints kept besides the milestones: the newest N (0: keep every one)")
    g.add_argument("--milestone_every_n_epochs", type=int, default=None,
                   help="epoch-end checkpoints kept for good every N epochs (default: 10 x --save_every_n_epochs; "
                        "0: none); a multiple of --save_every_n_epochs")
    g.add_argument("--log_every_n_steps", "--log_freq", dest="log_every_n_steps", type=int, default=50,
                   help="logging window in steps (--log_freq: MetaContrastive's spelling)")
    add_bool(g, "diagnostics", True, "on each logging step: log S, FlatNCE/InfoNCE gradient ratio, MI bound, "
                                     "alignment, uniformity, embedding std and effective rank, gradient norm")
    g.add_argument("--limit_train_batches", type=int, default=None, help="cap on steps per epoch")
    g.add_argument("--stop_after_epoch", type=int, default=None,
                   help="end this job after that epoch (checkpointed), keeping the --epochs schedule; "
                        "for time-limited jobs that resume with --train_from latest")
    g.add_argument("--final_eval", type=protocol_list, default=[], metavar="PROTOCOLS",
                   help="when pretraining reaches --epochs, evaluate the last checkpoint with these protocols "
                        f"(comma-separated: {','.join(PROTOCOLS)}) into RUN/eval/, as --train_mode eval would")
    add_bool(g, "final_eval_baseline", False, "with --final_eval, also evaluate a random-init backbone of the same "
                                              "architecture and print it beside each result")
    return p


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def protocol_list(value: str) -> list[str]:
    names = split_list(value)
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown protocol {', '.join(unknown)}; choose from {', '.join(PROTOCOLS)}")
    return names


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    """One argument group per method, from its declared flags (a flag two methods declare is added once)."""
    seen: dict[str, Flag] = {}
    for name, spec in METHODS.items():
        fresh = [f for f in spec.flags if f.name not in seen]
        for flag in spec.flags:
            if seen.setdefault(flag.name, flag) != flag:
                raise ValueError(f"methods declare --{flag.name} twice with different defaults or help")
            if flag in fresh and f"--{flag.name}" in parser._option_string_actions:
                raise ValueError(f"method {name} declares --{flag.name}, which is already a flag of the tool")
        if not fresh:
            continue
        g = parser.add_argument_group(f"{spec.display} (--clr {name})")
        for flag in fresh:
            if isinstance(flag.default, bool):
                add_bool(g, flag.name, flag.default, flag.help)
            else:
                kind = flag.type or (type(flag.default) if flag.default is not None else str)
                g.add_argument(f"--{flag.name}", type=kind, default=flag.default, choices=flag.choices,
                               help=flag.help)


def identity_keys(clr: str) -> tuple[str, ...]:
    """The settings a resume of a ``clr`` run must not change."""
    return IDENTITY_KEYS + (METHODS[clr].identity if clr in METHODS else ())


def refuse_foreign_checkpoint(run_dir: str, path: str, saved: dict) -> None:
    """A checkpoint from outside ``run_dir`` may continue that run only if it is the same kind of run."""
    own = os.path.join(run_dir, "config.yaml")
    if os.path.dirname(os.path.abspath(path)) == os.path.abspath(run_dir) or not os.path.isfile(own):
        return
    mine = read_yaml(own)
    for key in identity_keys(mine.get("clr", "")):
        if key in mine and key in saved and mine[key] != saved[key]:
            raise UserError(f"{path} comes from another kind of run (--{key}={saved[key]}) than {run_dir} "
                            f"(--{key}={mine[key]}); resume a run from its own checkpoints or start a new one")


# Seed 001's --network values: (our --arch, CIFAR stem).
ULC_NETWORKS = {f"resnet{d}{suffix}": (f"resnet{d}", suffix == "_cifar") for d in (18, 34, 50, 101, 152)
                for suffix in ("", "_cifar")}


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
    cfg.log_dir = os.path.join(cfg.results_dir, cfg.dataset_name, f"{cfg.batch_size}_{METHODS[cfg.clr].display}",
                               cfg.run_id)


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
        cfg.fc_iters = cfg.iters if "iters" in explicit else None
        cfg.iters = None
    if cfg.dist_address is not None and launched_rank() == 0:
        print("note: --dist_address is accepted for seed 002's commands and not used: torchrun sets the address "
              "(--rdzv_endpoint, or MASTER_ADDR/MASTER_PORT)", file=sys.stderr)


def explicit_dests(argv: list[str]) -> set[str]:
    """Names of the settings given on the command line (not defaults, not yaml)."""
    shadow = build_parser()
    for action in shadow._actions:
        action.default = argparse.SUPPRESS
    ns, _ = shadow.parse_known_args(argv)
    return set(vars(ns))


def read_yaml(path: str) -> dict:
    """A yaml mapping, read safely (no python tags); any problem is one line."""
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        raise UserError(f"config file {path} is not valid yaml ({str(err).splitlines()[0]})") from err
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must be a mapping of flag names to values")
    return values


def apply_yaml(parser: argparse.ArgumentParser, path: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found; pass an existing yaml, e.g. configs/quickstart.yaml")
    values = read_yaml(path)
    known = {a.dest for a in parser._actions}
    for recorded in ("schedule", "input_stats", "provenance"):  # recorded in a run's config.yaml: not flags
        if isinstance(values.get(recorded), dict):
            del values[recorded]
    if any(isinstance(values.get(k), dict) for k in STHALLES_SECTIONS) or "fine_tune_from" in values:
        values = map_sthalles_config(values, path)
    unknown = sorted(set(values) - known - {"help"})
    if unknown:
        raise UserError(f"unknown key(s) in {path}: {', '.join(unknown)}; keys are flag names as in --help")
    numeric = {a.dest: a.type for a in parser._actions if a.type in (int, float)}
    for key, value in values.items():  # YAML 1.1 reads 10e-6 (no dot) as a string: read it as the number it is
        if isinstance(value, str) and key in numeric:
            try:
                number = float(value)
            except ValueError:
                continue  # not a number at all: argparse's check names the flag
            values[key] = int(number) if numeric[key] is int and number.is_integer() else number
    parser.set_defaults(**values)


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
            sizes = [int(v) for v in re.findall(r"\d+", str(value))]
            if not sizes:
                raise UserError(f"{path}: dataset.input_shape {value!r} is not a shape like (96,96,3)")
            out[target] = sizes[0]
        elif target == "similarity":
            out[target] = "cosine" if value else "dot"
        elif target == "precision":
            if value:
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


def validate(cfg: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:  # yaml and saved values bypass argparse's own checks
        value = getattr(cfg, action.dest, None)
        if action.choices is not None and value is not None and value not in action.choices:
            raise UserError(f"{action.dest}={value!r} is not one of {', '.join(map(str, action.choices))}")
    if cfg.batch_size < 2:
        raise UserError(f"--batch_size must be at least 2 (contrastive losses need negatives), got {cfg.batch_size}")
    spec = METHODS[cfg.clr]
    spec.settle(cfg)
    if cfg.n_views is None:  # a method's own settle may leave it
        cfg.n_views = 2
    if cfg.n_views < spec.min_views:
        raise UserError(f"--n_views must be at least {spec.min_views} for {cfg.clr}, got {cfg.n_views}")
    spec.validate(cfg)
    if isinstance(cfg.final_eval, str):  # a yaml list written as one string
        cfg.final_eval = split_list(cfg.final_eval)
    unknown = [p for p in cfg.final_eval if p not in PROTOCOLS]
    if unknown:
        raise UserError(f"--final_eval: unknown protocol {', '.join(unknown)}; choose from {', '.join(PROTOCOLS)}")
    for name in ("epochs", "save_every_n_epochs", "log_every_n_steps", "num_proj_layers", "proj_out_dim", "accu_iter"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("limit_train_batches", "stop_after_epoch", "image_size", "proj_hidden_dim", "iters"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("temperature", "knn_temperature"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("lr", "weight_decay", "fc_lr", "fc_weight_decay", "momentum", "fc_momentum"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if not 0 <= cfg.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2**32), got {cfg.seed}")
    if cfg.workers < 0 or cfg.warmup_epochs < 0:
        raise UserError("--workers and --warmup_epochs must not be negative")
    if not cfg.width_multiplier > 0:
        raise UserError(f"--width_multiplier must be positive, got {cfg.width_multiplier}")
    if not 0 <= cfg.valid_size < 1:
        raise UserError(f"--valid_size is the held-out fraction of the pretraining set, in [0, 1), got "
                        f"{cfg.valid_size}")
    if cfg.valid_every_n_epochs < 1:
        raise UserError(f"--valid_every_n_epochs must be at least 1, got {cfg.valid_every_n_epochs}")
    if not 0 <= cfg.rot_task_p <= 1:
        raise UserError(f"--rot_task_p (--rottlr_p) is a probability in [0, 1], got {cfg.rot_task_p}")
    if cfg.rot_pred_weight < 0:
        raise UserError(f"--rot_pred_weight (--rottlr) must not be negative (0 is off), got {cfg.rot_pred_weight}")
    if cfg.rot_pred_decay and not cfg.rot_pred_weight:
        raise UserError("--rot_pred_decay (--adpt) decays --rot_pred_weight, which is off; pass --rot_pred_weight")
    if not 0 < cfg.min_crop_scale <= 1:
        raise UserError(f"--min_crop_scale must be in (0, 1], got {cfg.min_crop_scale}")
    if cfg.semi_ratio is not None and not 0 < cfg.semi_ratio < 1:
        raise UserError(f"--semi_ratio must be a fraction in (0, 1), e.g. 0.01 or 0.1, got {cfg.semi_ratio}")
    for name in ("fc_epochs", "fc_batch_size", "knn_k", "fc_micro_batch_size", "pca_dim", "logistic_max_iter"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("eval_every_n_epochs", "eval_every_n_steps", "save_every_n_steps", "save_every_n_minutes"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.from_pretrained_head and not cfg.from_pretrained:
        raise UserError("--from_pretrained_head takes the head of --from_pretrained's run, which is not given; pass "
                        "--from_pretrained PATH")
    if cfg.from_pretrained and not os.path.exists(cfg.from_pretrained):
        raise UserError(f"--from_pretrained {cfg.from_pretrained} does not exist; pass a run directory, a "
                        "checkpoint_*.pth.tar or an export .pth")
    if cfg.keep_mid_epoch_checkpoints < 1:
        raise UserError(f"--keep_mid_epoch_checkpoints must be at least 1, got {cfg.keep_mid_epoch_checkpoints}")
    if cfg.faster_version and (cfg.input_pipeline == "hybrid" or cfg.decode_on_gpu):
        raise UserError("--faster_version holds the dataset on the device, which --input_pipeline hybrid and "
                        "--decode_on_gpu read from files; pick one")
    if cfg.keep_checkpoints < 0:
        raise UserError(f"--keep_checkpoints must not be negative (0 keeps every checkpoint), got "
                        f"{cfg.keep_checkpoints}")
    m = cfg.milestone_every_n_epochs
    if m is not None and m < 0:
        raise UserError(f"--milestone_every_n_epochs must not be negative (0: no milestones), got {m}")
    if m and m % cfg.save_every_n_epochs:
        raise UserError(f"--milestone_every_n_epochs {m} is not a multiple of --save_every_n_epochs "
                        f"{cfg.save_every_n_epochs}, so no checkpoint would be written at its epochs; pass a multiple "
                        "(or 0: no milestones)")


def inherit_from_run(cfg: argparse.Namespace, explicit: set[str]) -> None:
    """Evaluate on the run's own dataset and architecture unless the command line says otherwise."""
    if not cfg.checkpoint_dir:
        raise UserError(f"--train_mode={cfg.train_mode} needs --checkpoint_dir RUN_DIR (a pretraining run)"
                        + (", or --checkpoint_dir none for a random-init baseline" if cfg.train_mode == "eval" else ""))
    if cfg.checkpoint_dir.lower() in ("none", "pca"):  # baselines: no run to inherit from
        return
    if not os.path.isdir(cfg.checkpoint_dir):
        raise UserError(f"--checkpoint_dir {cfg.checkpoint_dir} does not exist; pass a pretraining run directory")
    available = list_checkpoints(cfg.checkpoint_dir)
    if not available:
        raise UserError(f"no checkpoint_*.pth.tar in {cfg.checkpoint_dir}; pass the directory of a pretraining "
                        "run (results/<dataset>/<bs>_<Method>/<date>) or --checkpoint_dir none")
    config = os.path.join(cfg.checkpoint_dir, "config.yaml")
    if os.path.isfile(config):
        saved = read_yaml(config)
    else:
        saved = load_checkpoint(available[max(available)]).get("args", {})
    if "arch" in explicit and saved.get("arch") not in (None, ARCH_ALIASES.get(cfg.arch, cfg.arch)):
        raise UserError(f"{cfg.checkpoint_dir} was pretrained with --model {saved['arch']}, not {cfg.arch}; "
                        f"drop --model or pass --model {saved['arch']}")
    for key in EVAL_INHERITED_KEYS:
        if key not in explicit and key in saved:
            setattr(cfg, key, saved[key])


def resolve(argv: list[str]) -> tuple[argparse.Namespace, dict | None, str | None]:
    """Parse ``argv`` into the final settings; load the checkpoint when resuming."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        apply_yaml(parser, pre.config)
    cfg = parser.parse_args(argv)
    explicit = explicit_dests(argv)

    resume = resume_path = None
    run_id_dir(cfg)
    if cfg.train_from is not None and not cfg.train_from.strip():
        raise UserError("--train_from is empty (an unset shell variable?); pass a checkpoint file name or 'latest'")
    if cfg.train_from and cfg.train_mode != "eval":  # eval mode: engine/evaluate.py continues its own fits
        if not cfg.log_dir:
            raise UserError("--train_from needs --log_dir RUN_DIR (the run to continue)")
        if not os.path.isdir(cfg.log_dir):
            raise UserError(f"--log_dir {cfg.log_dir} does not exist; pass the run directory to resume")
        verify = launched_rank() == 0  # rank 0 reads the file for its checksum; the others map it
        if cfg.train_from == "latest":
            resume_path, resume = load_latest(cfg.log_dir, verify)
        else:
            resume_path = resolve_checkpoint(cfg.log_dir, cfg.train_from)
            resume = load_checkpoint(resume_path, verify)
        if resume.get("foreign"):
            raise UserError(f"{resume_path} is a {resume['foreign']} checkpoint, which has no state of this tool to "
                            f"resume; start a new run from its weights with --from_pretrained {resume_path}")
        saved = resume.get("args", {})
        refuse_foreign_checkpoint(cfg.log_dir, resume_path, saved)
        for key in identity_keys(saved.get("clr", cfg.clr)):
            if key in explicit and key in saved and getattr(cfg, key) != saved[key]:
                raise UserError(f"{resume_path} was trained with --{key}={saved[key]}, not {getattr(cfg, key)}; "
                                f"drop --{key} to resume, or start a new run")
        for key, value in saved.items():
            if hasattr(cfg, key) and key not in explicit and key not in PER_INVOCATION_KEYS:
                setattr(cfg, key, value)
        if "keep_checkpoints" not in saved and "keep_checkpoints" not in explicit:
            cfg.keep_checkpoints = 0  # a run from before retention existed keeps every checkpoint, as it did

    if cfg.train_mode == "ssl":
        cfg.train_mode = "pretrain"
    if {"iters", "epochs"} <= explicit and cfg.train_mode != "eval":
        raise UserError("--iters and --epochs both set the length of the run; pass one of them")
    if "epochs" in explicit and "iters" not in explicit:  # the command line's length wins over a yaml's or run's
        cfg.iters = None
    map_seed_spellings(cfg, explicit)
    if cfg.train_mode in ("eval", "export"):
        inherit_from_run(cfg, explicit)
    cfg.arch = ARCH_ALIASES.get(cfg.arch, cfg.arch)
    if cfg.fp16_precision:
        cfg.precision = "fp16"
    if cfg.lr is None:
        cfg.lr = default_lr(cfg.optimizer, cfg.learning_rate_scaling)
    validate(cfg, parser)
    refuse_other_methods_flags(cfg, explicit)
    if cfg.train_mode == "eval":
        eval_defaults(cfg)
    return cfg, resume, resume_path


def refuse_other_methods_flags(cfg: argparse.Namespace, explicit: set[str]) -> None:
    """A method's exclusive flag given on the command line of another method would do nothing: one line."""
    own = {f.name for f in METHODS[cfg.clr].flags}
    for spec in METHODS.values():
        for flag in spec.flags:
            if flag.exclusive and flag.name in explicit and flag.name not in own and cfg.train_mode == "pretrain":
                users = [n for n, s in METHODS.items() if any(f.name == flag.name for f in s.flags)]
                raise UserError(f"--{flag.name} is a setting of --clr {' or '.join(users)}, not of {cfg.clr}; drop "
                                f"it or pass --clr {users[0]}")


def eval_defaults(cfg: argparse.Namespace) -> None:
    """Settings of an evaluation that depend on its protocol."""
    if cfg.fc_lr is None:
        cfg.fc_lr = (0.05 if cfg.transfer_mode == "finetune" else 0.1) * cfg.fc_batch_size / 256


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
    lines = []
    for protocol in cfg.final_eval:
        ev = argparse.Namespace(**{**vars(cfg), "train_mode": "eval", "checkpoint_dir": run_dir, "eval_all": False,
                                   "transfer_mode": protocol, "transfer_from_epoch": epoch, "train_from": None})
        path_of = functools.partial(record_path, os.path.join(run_dir, "eval"), protocol, cfg.semi_ratio, epoch)
        if only_missing and os.path.isfile(path_of()):
            continue
        if os.path.isfile(path_of(PARTIAL)):
            ev.train_from = "latest"
        eval_defaults(ev)
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
            base = argparse.Namespace(**{**vars(ev), "checkpoint_dir": "none", "transfer_from_epoch": None,
                                         "train_from": None,
                                         "results_dir": os.path.join(run_dir, "eval", "random_init")})
            baseline = evaluate(base)[-1]
            line += (f", random init {baseline['top1']:.2f}% ({record['top1'] - baseline['top1']:+.2f} points from "
                     "pretraining)")
        lines.append(line)
    if lines and launched_rank() == 0:
        print("final evaluation of " + run_dir + ":\n  " + "\n  ".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    provenance.COMMAND[:] = argv
    mode = "pretrain"
    try:
        cfg, resume, resume_path = resolve(argv)
        mode = cfg.train_mode
        if mode == "eval":
            evaluate(cfg)
        elif mode == "export":
            export_run(cfg)
        elif mode == "summary":
            if not cfg.checkpoint_dir:
                raise UserError("--train_mode=summary needs --checkpoint_dir: a run directory or results/")
            print_summary(cfg.checkpoint_dir)
        else:
            resumed, held = resume is not None, [resume]
            del resume  # pretrain holds the only reference and drops it once restored: the file is mapped, not read
            run_dir, finished = pretrain(cfg, held.pop(), resume_path)
            if cfg.final_eval and (finished or resumed):
                final_evaluations(cfg, run_dir, only_missing=not finished)
    except UserError as err:
        return report_error(worker_message(str(err)))
    except torch.cuda.OutOfMemoryError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
        if mode == "eval":
            return report_error(f"CUDA ran out of memory ({first[:160]}); lower --fc_micro_batch_size (images per "
                                "device and pass; --fc_batch_size is still reached by accumulation)")
        return report_error(f"CUDA ran out of memory ({first[:160]}); lower --batch_size (it is the global batch, "
                            "split over the GPUs) or use --precision bf16")
    except Preempted as stop:  # every rank stopped at the same step; rank 0 says so
        if launched_rank() == 0:
            print(f"preempted: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint written is intact", file=sys.stderr)
        return 130
    finally:
        cleanup()
    return 0


def report_error(message: str) -> int:
    """One line on stderr (prefixed with the rank under torchrun, except rank 0); exit status 2."""
    rank = launched_rank()
    print(f"{'' if rank == 0 else f'[rank {rank}] '}error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
