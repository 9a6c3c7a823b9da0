"""Every core setting, declared once: one frozen dataclass per concern (mode, data, model, objective,
optimisation, evaluation, run), each field a :func:`setting` carrying its default, help, choices, range, and
whether a resume must keep it (``identity``) or it belongs to one invocation only (``per_invocation``).

Generated from these declarations: the parser's groups and flags (:mod:`cli.parser`), the range checks
(:data:`RANGES`), the settings a resume must not change (:data:`IDENTITY_KEYS`) and those never saved with a run
(:data:`NOT_SAVED_KEYS`). A method declares its own flags on its :class:`models.methods.MethodSpec`; those
flags form its own group. :func:`concern` gives a typed view of one concern of resolved settings.

Adding a core setting: one field here (and the code that reads it); nothing else lists it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from data.datasets import DEFAULT_DATA

from common.settings import BOOL, Bounds, setting, typed

SEED_RANGE = Bounds(0, 2**32 - 1, "be in [0, 2**32)")


@dataclass(frozen=True)
class Mode:
    """What to do, and with which method."""

    GROUP: ClassVar[str] = "mode"

    train_mode: str = setting(
        "pretrain",
        "pretrain (FlatCLR's 'ssl' is accepted), eval (see --transfer_mode), export (a run's backbone as a "
        "plain state dict + json in RUN/export), or summary (where the runs in --checkpoint_dir stand)",
        choices=["pretrain", "ssl", "eval", "export", "summary"], per_invocation=True)
    clr: str = setting("flatclr", help_of="methods", choices="methods", identity=True)


@dataclass(frozen=True)
class Data:
    """The dataset and the views made of it."""

    GROUP: ClassVar[str] = "data"

    data: str = setting(DEFAULT_DATA, "dataset root")
    dataset_name: str = setting("cifar10", choices="datasets", identity=True)
    download: bool = setting(False, "download the torchvision datasets into --data if missing", flag=BOOL)
    train_subset: int | None = setting(
        None,
        "pretrain on this many images of the training set, drawn once by --subset_seed (default: all)",
        at_least=1, identity=True)
    eval_train_subset: int | None = setting(
        None,
        "the kNN memory and the linear/logistic/fine-tuning training images: this many of the training set, "
        "drawn by --subset_seed (with --train_subset N and the same N, the same images; default: all)",
        at_least=1)
    subset_seed: int = setting(
        0,
        "draws --train_subset and --eval_train_subset; not the run's --seed, so every cell of a sweep sees "
        "the same images",
        bounds=SEED_RANGE, identity=True)
    image_size: int | None = setting(None, "crop size (default: the dataset's)", at_least=1, identity=True)
    n_views: int | None = setting(
        None,
        "augmented views per image (default 2; with --head PN/R2D2, --n_supp + --n_query)",
        identity=True)
    workers: int | None = setting(
        None,
        "DataLoader worker processes per rank (default: the cores this process may use, at most 8; chosen by each "
        "invocation, never restored from a run)",
        at_least=0, machine=True)
    color_jitter_strength: float | None = setting(
        None,
        "SimCLR colour strength s (default 0.5 for <=64 px images, else 1.0)",
        bounds=Bounds(0, 2.5, "be in [0, 2.5] (hue is 0.2 x strength, at most 0.5)"))
    min_crop_scale: float = setting(
        0.08,
        "lower bound of the crop area",
        bounds=Bounds(0, 1, "be in (0, 1]", open_below=True))
    blur: bool | None = setting(None, "Gaussian blur in the views (default: on for images of 96 px or more)", flag=BOOL)
    skip_bad_images: bool = setting(
        False,
        "replace an unreadable image of a folder dataset by the next readable one (pretraining, evaluation) "
        "or leave it out (--faster_version)",
        flag=BOOL)
    rot_task_p: float = setting(
        0.0,
        "rotation as task augmentation (MetaContrastive): each image picked with this probability has all its"
        " views turned by one k*90 degrees, k uniform in {0,1,2,3} as the authors' code (so 3p/4 are turned)",
        bounds=Bounds(0, 1, "be a probability in [0, 1]"))
    faster_version: bool = setting(
        False,
        "dataset held as uint8 on the training device, views made there in batches with per-sample parameters"
        " (in-memory datasets)",
        flag=BOOL)
    input_pipeline: str = setting(
        "standard",
        "hybrid: workers decode, crop and flip (uint8 out), colour jitter, grayscale, blur, solarize and "
        "normalisation run batched on the training device (the ImageNet presets' choice)",
        choices=["standard", "hybrid"])
    decode_on_gpu: bool = setting(
        False,
        "hybrid pipeline whose workers only read the files: JPEGs decoded in batches on the GPU (on the CPU "
        "without one), then cropped there",
        flag=BOOL)


@dataclass(frozen=True)
class Model:
    """The backbone and the projection head."""

    GROUP: ClassVar[str] = "model"

    arch: str = setting(
        "resnet50",
        "ResNet backbone (any case: MetaContrastive's ResNet50 is resnet50)",
        parse=str.lower, choices="archs", identity=True)
    cifar_stem: bool | None = setting(
        None,
        "3x3 stride-1 stem without max-pool (default: images <= 64 px)",
        flag=BOOL, identity=True)
    width_multiplier: float = setting(
        1.0,
        "channel widths x this (0.25: 16-32-64-128, feature dim 128 for resnet18); 1.0 is torchvision's "
        "ResNet",
        bounds=Bounds(0, None, "be positive", open_below=True), identity=True)
    proj_head_mode: str = setting("nonlinear", choices=["nonlinear", "linear", "none"], identity=True)
    num_proj_layers: int = setting(2, "Linear layers in the nonlinear head", at_least=1, identity=True)
    proj_hidden_dim: int | None = setting(None, "default: the backbone's feature dim", at_least=1, identity=True)
    proj_out_dim: int = setting(128, at_least=1, identity=True)
    proj_bn: bool = setting(
        True,
        "BN in the projection's hidden layers (BN1 of the seed-001 ablation)",
        flag=BOOL, identity=True)
    proj_out_bn: bool = setting(False, "BN on the projection output (BN3)", flag=BOOL, identity=True)
    proj_out_bn_affine: bool = setting(True, "affine parameters of that output BN", flag=BOOL, identity=True)


@dataclass(frozen=True)
class Objective:
    """The loss settings every method shares."""

    GROUP: ClassVar[str] = "objective"

    temperature: float = setting(
        0.1,
        "SimCLR/FlatCLR/InsDis temperature",
        bounds=Bounds(0, None, "be positive", open_below=True))
    loss: str | None = setting(
        None,
        "the loss of an InfoNCE-shaped method: infonce or flatnce (default: the method's own; --clr simclr --loss "
        "flatnce is --clr flatclr); insd: UnsupervisedLearningCodes' spelling of --insdis_loss softmax (with --clr "
        "insdis)",
        choices=["infonce", "flatnce", "insd"], identity=True)
    rot_pred_weight: float = setting(
        0.0,
        "auxiliary rotation prediction (MetaContrastive): a linear 4-way head on the projections predicts "
        "each view's random rotation in a second forward; this weight x its cross-entropy is added (0: off)",
        bounds=Bounds(0, None, "not be negative (0 is off)"), identity=True)
    rot_pred_decay: bool = setting(False, "decay --rot_pred_weight along a cosine to 0 over the run", flag=BOOL)


@dataclass(frozen=True)
class Optimisation:
    """The optimizer, its schedule and precision."""

    GROUP: ClassVar[str] = "optimisation"

    batch_size: int = setting(
        512,
        "global batch size (all ranks)",
        bounds=Bounds(2, None, "be at least 2 (contrastive losses need negatives)"))
    epochs: int = setting(100, at_least=1)
    iters: int | None = setting(
        None,
        "optimizer steps in all, instead of --epochs (MetaContrastive's spelling): the run has ceil(iters / "
        "steps an epoch) epochs, the last one cut at step iters; the schedule ends there",
        at_least=1)
    accu_iter: int = setting(
        1,
        "split each step's batch into this many micro-batches, forward and backward one at a time (less "
        "memory; losses averaged, one gradient all-reduce a step); contrastive negatives and BN statistics "
        "stay within a micro-batch",
        at_least=1)
    lr: float | None = setting(
        None,
        "base lr, scaled by --learning_rate_scaling (default for lars/sgd: 0.3 with linear or none, 0.075 "
        "with sqrt, as FlatCLR's README; 1e-3 for adamw)",
        at_least=0)
    learning_rate_scaling: str = setting(
        "linear",
        "lr = base*bs/256 (linear), base*sqrt(bs) (sqrt) or base (none)",
        choices=["linear", "sqrt", "none"])
    optimizer: str = setting("lars", choices=["lars", "sgd", "adamw"], identity=True)
    weight_decay: float = setting(1e-06, at_least=0)
    wd_bias_and_norm: bool = setting(
        False,
        "also decay biases and normalisation parameters (default: only weights, as SimCLR; other libraries "
        "decay all under SGD)",
        flag=BOOL)
    momentum: float = setting(0.9, at_least=0)
    warmup_epochs: int = setting(
        10,
        "linear warmup; one as long as the run or longer is capped at 10%% of the run's steps",
        at_least=0)
    cap_warmup: bool = setting(True, "apply that cap (--no-cap_warmup keeps the full --warmup_epochs)", flag=BOOL)
    scheduler: str = setting("cosine", choices=["cosine", "constant"])
    precision: str = setting("fp32", choices=["fp32", "bf16", "fp16"])
    fp16_precision: bool = setting(False, "FlatCLR's switch: same as --precision fp16", flag=BOOL)
    sync_bn: bool | None = setting(None, "SyncBatchNorm across ranks (default: on for multi-GPU)", flag=BOOL)
    channels_last: bool = setting(True, "NHWC memory format: faster ResNet steps on CUDA and on the CPU", flag=BOOL)
    compile: bool = setting(False, "torch.compile the model", flag=BOOL)


@dataclass(frozen=True)
class Evaluation:
    """Evaluation protocols (--train_mode=eval) and monitors during pretraining."""

    GROUP: ClassVar[str] = "evaluation (--train_mode=eval)"

    transfer_mode: str = setting("linear_eval", choices="protocols")
    checkpoint_dir: str | None = setting(
        None,
        "pretraining run directory to evaluate; 'none' for a random-init baseline, 'pca' for PCA of the raw "
        "pixels (--pca_dim components)",
        per_invocation=True)
    eval_dir: str | None = setting(
        None,
        "where the evaluation writes its records, t-SNE and TensorBoard events (default: RUN/eval; for a "
        "baseline, a new directory under --results_dir)",
        per_invocation=True)
    pca_dim: int = setting(256, "components of the --checkpoint_dir pca baseline", at_least=1)
    logistic_max_iter: int = setting(
        1000,
        "L-BFGS iterations of --transfer_mode logistic (scikit-learn, C=1, standardised features)",
        at_least=1)
    transfer_from_epoch: int | None = setting(None, "checkpoint epoch (default: the last)")
    eval_all: bool = setting(False, "evaluate every checkpoint and plot accuracy against epoch", flag=BOOL)
    fc_epochs: int = setting(100, "epochs of linear eval / fine-tuning", at_least=1)
    fc_iters: int | None = setting(
        None,
        "optimizer steps of linear eval / fine-tuning in all, instead of --fc_epochs (rounded up to whole "
        "epochs)",
        at_least=1)
    fc_batch_size: int = setting(
        4096,
        "global batch of linear eval / fine-tuning (one optimizer step; SimCLR's 4096)",
        at_least=1)
    fc_micro_batch_size: int | None = setting(
        None,
        "per-device images per forward/backward when training through the backbone (finetune, --fc_augment); "
        "--fc_batch_size is reached by accumulating them (default: 256 for finetune, 1024 for --fc_augment "
        "linear eval)",
        at_least=1)
    fc_lr: float | None = setting(
        None,
        "lr (default 0.1*fc_batch_size/256 for linear_eval, 0.05*fc_batch_size/256 for finetune)",
        at_least=0)
    fc_optimizer: str = setting("sgd", choices=["sgd", "lars", "adamw"])
    fc_weight_decay: float = setting(0.0, at_least=0)
    fc_momentum: float = setting(0.9, at_least=0)
    fc_scheduler: str = setting("cosine", choices=["cosine", "constant"])
    fc_augment: bool = setting(
        False,
        "linear eval through the frozen backbone on augmented images (default: train on cached features, much"
        " faster)",
        flag=BOOL)
    semi_ratio: float | None = setting(
        None,
        "train on this class-balanced fraction of the labels (e.g. 0.01, 0.1)",
        bounds=Bounds(0, 1, "be a fraction in (0, 1), e.g. 0.01 or 0.1", open_below=True, open_above=True))
    knn_k: int = setting(200, at_least=1)
    knn_temperature: float = setting(0.1, bounds=Bounds(0, None, "be positive", open_below=True))
    tsne: bool = setting(
        True,
        "write a t-SNE PNG of the test features and a TensorBoard projector embedding",
        flag=BOOL)
    tsne_layer: str = setting(
        "backbone",
        "which features the t-SNE draws: the last conv layer's (backbone) or the projection head's output "
        "(seed 001 draws both); experiments/tsne_compare.py sets runs side by side",
        choices=["backbone", "projection"])
    eval_every_n_epochs: int = setting(
        0,
        "during pretraining: kNN accuracy on the test split every K epochs (0: off)",
        at_least=0)
    online_probe: bool = setting(
        False,
        "during pretraining: train a linear classifier on the detached backbone features of each step's first "
        "view, with its own SGD (the backbone is not changed by it); logs its training accuracy with the step's "
        "values and its top-1 on the test split at each epoch end",
        flag=BOOL)
    probe_lr: float = setting(
        0.1,
        "peak lr of --online_probe (SGD, momentum 0.9, no weight decay; it follows the pretraining schedule's "
        "shape)",
        bounds=Bounds(0, None, "be positive", open_below=True))
    valid_size: float = setting(
        0.0,
        "hold out this fraction of the pretraining images and log the contrastive top-1/top-5 (is the "
        "positive the highest logit) and loss on them (sthalles/SimCLR's valid_size; 0: off)",
        bounds=Bounds(0, 1, "be the held-out fraction of the pretraining set, in [0, 1)", open_above=True))
    valid_every_n_epochs: int = setting(1, "how often that held-out check runs", at_least=1)
    eval_every_n_steps: int = setting(
        0,
        "during pretraining: kNN accuracy on the test split every N steps, to TensorBoard and the output (0: "
        "off)",
        at_least=0)


@dataclass(frozen=True)
class Run:
    """Run directories, checkpoints, resume and logging."""

    GROUP: ClassVar[str] = "run"

    device: str = setting("auto", choices=["auto", "cpu", "cuda"])
    seed: int = setting(42, bounds=SEED_RANGE)
    results_dir: str = setting("results", "root of new run directories")
    log_dir: str | None = setting(None, "run directory (to resume, or to name a new run)", per_invocation=True)
    from_pretrained: str | None = setting(
        None,
        "start a new pretraining run from the backbone of another run (its directory, a checkpoint or an "
        "export); --train_from resumes the same run instead")
    from_pretrained_head: bool = setting(False, "with --from_pretrained, also take its projection head", flag=BOOL)
    train_from: str | None = setting(
        None,
        "checkpoint to resume from: a file in --log_dir, a path, or 'latest'; in eval mode 'latest' continues"
        " an interrupted finetune / --fc_augment linear eval",
        per_invocation=True)
    save_every_n_epochs: int = setting(2, at_least=1)
    save_every_n_steps: int = setting(
        0,
        "also save mid-epoch every N steps (0: off); SIGTERM/SIGUSR1 always save and stop",
        at_least=0)
    save_every_n_minutes: float = setting(0.0, "also save mid-epoch every M minutes", at_least=0)
    keep_mid_epoch_checkpoints: int = setting(
        2,
        "mid-epoch checkpoints kept (none older than the last epoch-end one)",
        at_least=1)
    keep_checkpoints: int = setting(
        3,
        "epoch-end checkpoints kept besides the milestones: the newest N (0: keep every one)",
        bounds=Bounds(0, None, "not be negative (0 keeps every checkpoint)"))
    milestone_every_n_epochs: int | None = setting(
        None,
        "epoch-end checkpoints kept for good every N epochs (default: 10 x --save_every_n_epochs; 0: none); a"
        " multiple of --save_every_n_epochs",
        bounds=Bounds(0, None, "not be negative (0: no milestones)"))
    log_every_n_steps: int = setting(50, "logging window in steps", at_least=1)
    diagnostics: bool = setting(
        True,
        "on each logging step: log S, FlatNCE/InfoNCE gradient ratio, MI bound, alignment, uniformity, "
        "embedding std and effective rank, gradient norm",
        flag=BOOL)
    limit_train_batches: int | None = setting(None, "cap on steps per epoch", at_least=1)
    stop_after_epoch: int | None = setting(
        None,
        "end this job after that epoch (checkpointed), keeping the --epochs schedule; for time-limited jobs "
        "that resume with --train_from latest",
        at_least=1, per_invocation=True)
    final_eval: list[str] = setting([], help_of="final_eval", parse="protocols", metavar="PROTOCOLS")
    final_eval_baseline: bool = setting(
        False,
        "with --final_eval, also evaluate a random-init backbone of the same architecture and print it beside"
        " each result",
        flag=BOOL)



CONCERNS = (Mode, Data, Model, Objective, Optimisation, Evaluation, Run)  # the --help order (methods after Objective)


def declared() -> list[tuple[type, dataclasses.Field]]:
    """(concern, field) of every core setting, in --help order."""
    return [(c, f) for c in CONCERNS for f in dataclasses.fields(c)]


concern = typed  # the typed view of one concern of resolved settings, e.g. concern(Data, cfg)


RANGES: dict[str, Bounds] = {f.name: f.metadata["bounds"] for _, f in declared() if f.metadata["bounds"]}
IDENTITY_KEYS: tuple[str, ...] = tuple(f.name for _, f in declared() if f.metadata["identity"])
PER_INVOCATION_KEYS: tuple[str, ...] = tuple(f.name for _, f in declared() if f.metadata["per_invocation"]) + (
    "config",)
MACHINE_KEYS: tuple[str, ...] = tuple(f.name for _, f in declared() if f.metadata["machine"])
NOT_SAVED_KEYS = PER_INVOCATION_KEYS + MACHINE_KEYS  # left out of config.yaml, never taken from a resumed run


def machine_workers() -> int:
    """``--workers``' default: the cores this process may use (its share of a torchrun node), at most 8."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_process))
