"""The parser, generated in one place: the core flags grouped by concern (mode, data, model, objective,
optimisation, evaluation, run), one group per method from its declared flags (:class:`models.methods.Flag`),
and the other repositories' spellings from :mod:`cli.compat` (shown by ``--help-all``, not ``--help``)."""
from __future__ import annotations

import argparse
import sys

from cli.compat import add_compat_flags
from cli.options import Parser, add_bool, finite_float, protocol_list
from data.datasets import DATASETS, DEFAULT_DATA
from engine.evaluate import PROTOCOLS
from models import ARCH_ALIASES, BACKBONES, METHODS
from models.methods import Flag


class HelpAll(argparse.Action):
    """``--help-all``: the help with the compatibility spellings, then exit 0."""

    def __call__(self, parser, namespace, values, option_string=None):
        build_parser(show_compat=True).print_help(sys.stdout)
        parser.exit()


def build_parser(show_compat: bool = False) -> argparse.ArgumentParser:
    """The core flags grouped by concern, each method's own group, then the other tools' spellings (listed by
    ``--help-all`` only; see :mod:`cli.compat`)."""
    p = Parser(prog="main.py", usage="%(prog)s [--config FILE] [--flag VALUE ...]   (--help-all: with other "
                                      "tools' spellings)",
               description="Contrastive self-supervised pretraining (FlatCLR family).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", default=None, help="yaml file of defaults (keys = flag names); flags win")

    for group in (_mode, _data, _model, _objective):
        group(p)
    add_method_flags(p)
    for group in (_optimisation, _evaluation, _run):
        group(p)
    add_compat_flags(p, show_compat)
    p.add_argument("--help-all", action=HelpAll, nargs=0, default=argparse.SUPPRESS, help="this help with the other tools' spellings "
                                                              "(FlatCLR, UnsupervisedLearningCodes, MetaContrastive)")
    for action in p._actions:  # every number flag, the methods' and the other tools' too: finite
        if action.type is float:
            action.type = finite_float
    return p


def _mode(p: argparse.ArgumentParser) -> None:
    """What to do, and with which method."""
    g = p.add_argument_group("mode")
    g.add_argument("--train_mode", default="pretrain", choices=["pretrain", "ssl", "eval", "export", "summary"],
                   help="pretrain (FlatCLR's 'ssl' is accepted), eval (see --transfer_mode), export (a run's "
                        "backbone as a plain state dict + json in RUN/export), or summary (where the runs in "
                        "--checkpoint_dir stand)")
    g.add_argument("--clr", default="flatclr", choices=list(METHODS),
                   help="method: " + "; ".join(f"{k} ({s.display}: {s.summary})" for k, s in METHODS.items()))


def _data(p: argparse.ArgumentParser) -> None:
    """The dataset and the views made of it."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=DEFAULT_DATA, help="dataset root")
    g.add_argument("--dataset_name", default="cifar10", choices=list(DATASETS))
    add_bool(g, "download", False, "download the torchvision datasets into --data if missing")
    g.add_argument("--train_subset", type=int, default=None,
                   help="pretrain on this many images of the training set, drawn once by --subset_seed (default: all)")
    g.add_argument("--eval_train_subset", type=int, default=None,
                   help="the kNN memory and the linear/logistic/fine-tuning training images: this many of the "
                        "training set, drawn by --subset_seed (with --train_subset N and the same N, the same images; "
                        "default: all)")
    g.add_argument("--subset_seed", type=int, default=0,
                   help="draws --train_subset and --eval_train_subset; not the run's --seed, so every cell of a "
                        "sweep sees the same images")
    g.add_argument("--image_size", type=int, default=None, help="crop size (default: the dataset's)")
    g.add_argument("--n_views", type=int, default=None,
                   help="augmented views per image (default 2; with --head PN/R2D2, --n_supp + --n_query)")
    g.add_argument("--workers", type=int, default=8, help="DataLoader worker processes per rank")
    g.add_argument("--color_jitter_strength", type=float, default=None,
                   help="SimCLR colour strength s (default 0.5 for <=64 px images, else 1.0)")
    g.add_argument("--min_crop_scale", type=float, default=0.08, help="lower bound of the crop area")
    add_bool(g, "blur", None, "Gaussian blur in the views (default: on for images of 96 px or more)")
    add_bool(g, "skip_bad_images", False, "replace an unreadable image of a folder dataset by the next readable "
                                          "one (pretraining, evaluation) or leave it out (--faster_version)")
    g.add_argument("--rot_task_p", type=float, default=0.0,
                   help="rotation as task augmentation (MetaContrastive): each image picked with this probability "
                        "has all its views turned by one k*90 degrees, k uniform in {0,1,2,3} as the authors' code "
                        "(so 3p/4 are turned)")
    add_bool(g, "faster_version", False, "dataset held as uint8 on the training device, views made there in "
                                         "batches with per-sample parameters (in-memory datasets)")
    g.add_argument("--input_pipeline", default="standard", choices=["standard", "hybrid"],
                   help="hybrid: workers decode, crop and flip (uint8 out), colour jitter, grayscale, blur, solarize "
                        "and normalisation run batched on the training device (the ImageNet presets' choice)")
    add_bool(g, "decode_on_gpu", False, "hybrid pipeline whose workers only read the files: JPEGs decoded in "
                                        "batches on the GPU (on the CPU without one), then cropped there")


def _model(p: argparse.ArgumentParser) -> None:
    """The backbone and the projection head."""
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", type=str.lower,
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


def _objective(p: argparse.ArgumentParser) -> None:
    """The loss settings every method shares."""
    g = p.add_argument_group("objective")
    g.add_argument("--temperature", type=float, default=0.1,
                   help="SimCLR/FlatCLR/InsDis temperature")
    g.add_argument("--rot_pred_weight", type=float, default=0.0,
                   help="auxiliary rotation prediction (MetaContrastive): a linear 4-way head on the projections "
                        "predicts each view's random rotation in a second forward; this weight x its cross-entropy "
                        "is added (0: off)")
    add_bool(g, "rot_pred_decay", False, "decay --rot_pred_weight along a cosine to 0 over the run")


def _optimisation(p: argparse.ArgumentParser) -> None:
    """The optimizer, its schedule and precision."""
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


def _evaluation(p: argparse.ArgumentParser) -> None:
    """Evaluation protocols (--train_mode=eval) and monitors during pretraining."""
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
    g.add_argument("--fc_iters", type=int, default=None,
                   help="optimizer steps of linear eval / fine-tuning in all, instead of --fc_epochs (rounded up to "
                        "whole epochs)")
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
    g.add_argument("--eval_every_n_steps", type=int, default=0,
                   help="during pretraining: kNN accuracy on the test split every N steps, to TensorBoard and the "
                        "output (0: off)")


def _run(p: argparse.ArgumentParser) -> None:
    """Run directories, checkpoints, resume and logging."""
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--results_dir", default="results", help="root of new run directories")
    g.add_argument("--log_dir", default=None,
                   help="run directory (to resume, or to name a new run)")
    g.add_argument("--from_pretrained", default=None,
                   help="start a new pretraining run from the backbone of another run (its directory, a checkpoint "
                        "or an export); --train_from resumes the same run instead")
    add_bool(g, "from_pretrained_head", False, "with --from_pretrained, also take its projection head")
    g.add_argument("--train_from", default=None,
                   help="checkpoint to resume from: a file in --log_dir, a path, or 'latest'; in eval mode "
                        "'latest' continues an interrupted finetune / --fc_augment linear eval")
    g.add_argument("--save_every_n_epochs", type=int, default=2)
    g.add_argument("--save_every_n_steps", type=int, default=0,
                   help="also save mid-epoch every N steps (0: off); SIGTERM/SIGUSR1 always save and stop")
    g.add_argument("--save_every_n_minutes", type=float, default=0.0, help="also save mid-epoch every M minutes")
    g.add_argument("--keep_mid_epoch_checkpoints", type=int, default=2,
                   help="mid-epoch checkpoints kept (none older than the last epoch-end one)")
    g.add_argument("--keep_checkpoints", type=int, default=3,
                   help="epoch-end checkpoints kept besides the milestones: the newest N (0: keep every one)")
    g.add_argument("--milestone_every_n_epochs", type=int, default=None,
                   help="epoch-end checkpoints kept for good every N epochs (default: 10 x --save_every_n_epochs; "
                        "0: none); a multiple of --save_every_n_epochs")
    g.add_argument("--log_every_n_steps", type=int, default=50,
                   help="logging window in steps")
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


