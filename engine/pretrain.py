"""Self-supervised pretraining: one loop for every method.

views -> method(views, index) -> loss (negatives gathered from every rank inside the method) ->
finite check on all ranks -> backward -> optimizer step with the per-step LR -> method.after_step with the
step's outputs (BYOL EMA, InsDis bank) -> metrics; a checkpoint every ``--save_every_n_epochs`` and at the end.

Reading order: :func:`pretrain` (set-up, then the epochs), :class:`engine.trainer.Trainer` (one step),
:func:`train_epoch` (one pass with progress and logs), :func:`end_epoch` (monitor, metrics, checkpoint);
the run directory and its files are :mod:`engine.rundir`.
"""
from __future__ import annotations

import math
import os
import sys
import time
from argparse import Namespace
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from common.device import pick_device
from common.provenance import provenance
from common.distributed import (DistInfo, all_reduce_sum, barrier, init_distributed, on_main_only,
                                shared_outcome)
from common.settings import derive
from common.errors import Preempted, UserError
from data.augment import default_blur
from data.datasets import Split, fixed_subset, hold_out, load_split
from data.loaders import pretrain_loader
from engine import checkpoint as ckpt_io
from engine.knn import KnnMonitor, extract_features
from engine.memory import check_fits
from engine.probe import OnlineProbe
from engine.optim import build_optimizer, plan_schedule, scaled_lr
from engine.runlog import Meter, MetricsLog, plot_curves, write_config
from engine.rundir import PREEMPTED_MARK, RunClaim, RunFiles, resume_command
from engine.trainer import StepParts, Trainer
from engine.stop import StopRequests
from models import METHODS, build_method
from models.backbones import cifar_stem_for
from models.checkpoint_file import CheckpointError


def pretrain(cfg: Namespace, resume: dict | None = None,
             resume_path: str | None = None) -> tuple[str, bool, Namespace]:
    """Run (or continue) pretraining; returns the run directory, whether this call trained up to --epochs
    (then ``--final_eval`` follows), and the settings it ran with (``cfg`` with what it derived: the epochs of an
    ``--iters`` run, the input statistics). Raises ``Preempted`` after saving the exact position when SIGTERM or
    SIGUSR1 arrives."""
    device = pick_device(cfg.device)
    dist = init_distributed(device.type)
    cfg, last_epoch = plan_resume(cfg, dist, resume, resume_path)
    if resume is not None and dist.is_main:
        print(f"resuming from {resume_path} (epoch {int(resume['epoch'])}"
              + (f", step {int(resume['batch'])} of the next" if resume.get("batch") else "") + ")", flush=True)
    if resume is not None and int(resume["epoch"]) >= last_epoch:  # before anything is built or written
        if dist.is_main:
            print(f"nothing to do: the run has completed {int(resume['epoch'])} of {cfg.epochs} epochs")
        return cfg.log_dir, False, cfg
    check_setup(cfg, dist, device)
    setup = build_setup(cfg, dist, device, resume, resume_path)
    # what the loop still needs of the checkpoint: its RNG and loader states, and a mid-epoch one's running sums
    carry = None if resume is None else ckpt_io.to_host({"rng": resume.get("rng", []), "loader": resume.get("loader"),
                                                         "meter": resume.get("meter")})  # copies, not the mapping
    del resume  # restored: the mapped checkpoint is let go, so that retention's deleting it frees its space
    return train(setup, carry, resume_path), setup.last_epoch == setup.cfg.epochs, setup.cfg


def plan_resume(cfg: Namespace, dist: DistInfo, resume: dict | None,
                resume_path: str | None) -> tuple[Namespace, int]:
    """The settings and the last epoch this call trains; on a resume, after the ranks agree on the checkpoint
    (each chose it on its own) and a resumed --iters run has its epochs from the checkpoint's steps per epoch."""
    if resume is not None:
        ckpt_io.agree_across_ranks(resume_path, resume)
    saved_steps = (resume or {}).get("scheduler", {}).get("steps_per_epoch")
    if cfg.iters and saved_steps:  # a resumed --iters run: its epochs as the (possibly new) --iters makes them
        cfg = derive(cfg, epochs=math.ceil(cfg.iters / saved_steps))
        done, cut = int(resume["epoch"]), int(resume.get("global_step", 0)) < int(resume["epoch"]) * saved_steps
        if cut and not resume.get("batch") and cfg.iters > int(resume.get("global_step", 0)):
            raise UserError(f"{resume_path} ends epoch {done} cut at step {resume['global_step']} by the old --iters; "
                            "a cut epoch cannot be continued: start a new run from it with --from_pretrained")
    return cfg, last_epoch_of(cfg)


def last_epoch_of(cfg: Namespace) -> int:
    """The last epoch this call trains: --epochs, or --stop_after_epoch when it comes first."""
    return cfg.epochs if cfg.stop_after_epoch is None else min(cfg.epochs, cfg.stop_after_epoch)


@dataclass
class Setup:
    """Everything a run trains with, built once by :func:`build_setup`: the one object :func:`train` takes."""

    cfg: Namespace
    dist: DistInfo
    device: torch.device
    split: Split
    loader: object
    epoch_setters: list
    validator: "HeldOutCheck | None"
    method: nn.Module
    model: nn.Module
    memory_format: torch.memory_format
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: object
    note: str | None
    steps_per_epoch: int
    last_epoch: int
    start: tuple[int, int, int]  # (epochs completed, steps into the next one, steps)
    probe: OnlineProbe | None = None  # --online_probe

    def step_parts(self) -> StepParts:
        """What the trainer steps, and the settings a step reads."""
        cfg = self.cfg
        return StepParts(self.model, self.method, self.optimizer, self.schedule.rates(), self.device, self.scaler,
                         cfg.precision, self.memory_format, cfg.rot_task_p, cfg.seed, self.dist.rank, cfg.accu_iter,
                         self.probe)


def pretraining_split(cfg: Namespace) -> tuple[Split, Split | None]:
    """The pretraining images, and sthalles/SimCLR's fixed held-out part of them (``--valid_size``)."""
    split = load_split(cfg.dataset_name, cfg.data, train=True, download=cfg.download, pretrain=True,
                       image_size=cfg.image_size, skip_bad_images=bool(cfg.skip_bad_images))
    if cfg.train_subset is not None:
        split = fixed_subset(split, cfg.train_subset, cfg.subset_seed, "train_subset")
    if not cfg.valid_size:
        return split, None
    total = len(split.dataset)
    split, held_out = hold_out(split, cfg.valid_size, cfg.seed)
    if len(split.dataset) < cfg.batch_size:
        raise UserError(f"--valid_size {cfg.valid_size:g} leaves {len(split.dataset)} of {total} images for "
                        f"pretraining, fewer than --batch_size {cfg.batch_size}; lower --valid_size")
    return split, held_out


def build_setup(cfg: Namespace, dist: DistInfo, device: torch.device, resume: dict | None,
                resume_path: str | None) -> Setup:
    """Data, model (warm-started or restored), optimizer and schedule of the run."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    split, held_out = pretraining_split(cfg)
    # recorded in config.yaml and the checkpoints: what an export or load_pretrained tells a user to feed, and
    # this invocation's provenance (a resume records its own)
    cfg = derive(cfg, input_stats={"mean": list(split.mean), "std": list(split.std), "image_size": split.image_size},
                 provenance=provenance(device, dist.world_size))
    loader, epoch_setters = build_loader(cfg, split, dist, device)  # workers start at the first batch, not here
    check_fits(cfg, len(split.dataset), split.image_size, cifar_stem_of(cfg, split), dist.world_size, device)
    validator = HeldOutCheck(cfg, held_out, dist, device) if held_out is not None else None
    method, memory_format = build_model(cfg, split, dist, device)
    if cfg.from_pretrained and resume is None:  # a new run from another run's weights (a resume has its own)
        warm_start(method, cfg.from_pretrained, bool(cfg.from_pretrained_head), cfg.arch)
    steps_per_epoch = len(loader) if cfg.limit_train_batches is None else min(len(loader), cfg.limit_train_batches)
    if cfg.iters:  # --iters: as many epochs as the steps need, the last one cut (recorded in config.yaml)
        cfg = derive(cfg, epochs=math.ceil(cfg.iters / steps_per_epoch))
    schedule, note = plan_schedule(peak_lr=scaled_lr(cfg.lr, cfg.batch_size, cfg.learning_rate_scaling),
                                   kind=cfg.scheduler, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                                   warmup_epochs=cfg.warmup_epochs, cap_warmup=cfg.cap_warmup is not False,
                                   saved=resume.get("scheduler") if resume is not None else None,
                                   total_steps=cfg.iters)
    optimizer = build_optimizer(cfg.optimizer, method, schedule.peak_lr, cfg.weight_decay, cfg.momentum,
                                cfg.wd_bias_and_norm)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    start = (0, 0, 0) if resume is None else ckpt_io.restore(resume, resume_path, method, optimizer, scaler,
                                                              steps_per_epoch, dist.world_size, vars(cfg))
    last_epoch = last_epoch_of(cfg)  # again: --iters may have set --epochs
    probe = None
    if cfg.online_probe:
        method.keep_features = True
        test = load_split(cfg.dataset_name, cfg.data, train=False, download=cfg.download, image_size=split.image_size,
                          skip_bad_images=bool(cfg.skip_bad_images))
        probe = OnlineProbe(split, test, method.backbone.feat_dim, cfg.probe_lr, device, cfg.seed)
        if resume is not None and resume.get("probe") is not None:  # a run that had no probe starts one
            probe.load_state_dict(ckpt_io.to_host(resume["probe"]))
    return Setup(cfg, dist, device, split, loader, epoch_setters, validator, method, wrap_model(method, cfg, dist,
                 device), memory_format, optimizer, scaler, schedule, note, steps_per_epoch, last_epoch, start, probe)


def train(s: Setup, carry: dict | None, resume_path: str | None) -> str:
    """The epochs of a built run in its claimed directory; returns the directory. ``carry``: a resumed
    checkpoint's RNG and loader states and running sums (None for a new run)."""
    cfg, dist = s.cfg, s.dist
    start_epoch, start_batch, step = s.start
    resuming = carry is not None
    with RunClaim(cfg, dist, resuming=resuming, resume_path=resume_path) as claim:
        run = RunFiles(cfg, dist, claim, s.schedule.record(), s.epoch_setters)

        def open_run() -> None:
            write_config(run.dir, {**vars(cfg), "schedule": s.schedule.record()})
            run.open_logs(purge_step=step + 1 if resuming else None, resume_epoch=start_epoch if resuming else None)
            print(s.schedule.describe() + (f"\n{s.note}" if s.note else ""), flush=True)

        shared_outcome(on_main_only(open_run) if dist.is_main else None)
        loader_state = ckpt_io.restore_rng(carry, dist) if resuming else {}
        monitor = None
        if cfg.eval_every_n_epochs or cfg.eval_every_n_steps:
            monitor = KnnMonitor(cfg.dataset_name, cfg.data, s.split.image_size, s.device, cfg.workers, cfg.knn_k,
                                 cfg.knn_temperature, cfg.download, bool(cfg.skip_bad_images),
                                 memory_subset=cfg.eval_train_subset, subset_seed=cfg.subset_seed)
        with StopRequests(cfg) as requests:
            trainer = Trainer(s.step_parts(), step=step, last_ckpt=resume_path, requests=requests,
                              save_failure=run.writes.take_failure)
            meter = Meter.from_state(carry["meter"] if start_batch else None, s.device)
            try:
                for epoch in range(start_epoch, s.last_epoch):
                    for target in s.epoch_setters:
                        target.set_epoch(epoch, start_batch, loader_state)
                    steps = min(s.steps_per_epoch, cfg.iters - epoch * s.steps_per_epoch) if cfg.iters \
                        else s.steps_per_epoch
                    record = train_epoch(trainer, s.loader, epoch, steps, run, start_batch, meter, monitor)
                    end_epoch(trainer, record, run, monitor, s.last_epoch, s.validator)
                    start_batch, loader_state, meter = 0, {}, Meter()
            except Preempted as stop:
                run.finish_writes()
                if dist.is_main:  # what a job script looks for to requeue (torchrun's own exit status is 1)
                    with open(os.path.join(claim.dir, PREEMPTED_MARK), "w") as f:
                        f.write(f"{stop}\n")
                raise
            except KeyboardInterrupt as stop:  # Ctrl-C: main.py says what is kept and how to continue
                run.finish_writes(quiet=True)
                stop.resume_command = resume_command(claim.dir)
                raise
            except BaseException:
                run.finish_writes(quiet=True)
                raise
            run.finish_writes()
        barrier()
        run.close(f"done: {s.last_epoch} of {cfg.epochs} epochs; checkpoints, metrics.jsonl, curves.png and "
                  f"TensorBoard events are in {run.dir}" + (monitor_verdict(run.dir) if dist.is_main else ""))
    return claim.dir


def monitor_verdict(run_dir: str) -> str:
    """A warning line when the kNN monitor (--eval_every_n_epochs) ends below its first measurement: the run
    made its features worse, and what usually fixes that."""
    try:
        values = [r["knn_top1"] for r in MetricsLog(run_dir, resume_epoch=None).parse()[0] if "knn_top1" in r]
    except UserError:  # a damaged metrics.jsonl: the summary says so; nothing to judge here
        return ""
    if len(values) < 2 or values[-1] >= values[0]:
        return ""
    return (f"\nwarning: the kNN monitor fell from {values[0]:.2f}% to {values[-1]:.2f}% over the run: pretraining made "
            "the features worse; usually the lr is too high for this batch and width (try --learning_rate_scaling "
            "sqrt or a lower --lr) or the run is too short for its warmup (see curves.png)")


def check_setup(cfg: Namespace, dist: DistInfo, device: torch.device) -> None:
    """Refuse settings this process group or device cannot run."""
    if cfg.batch_size % dist.world_size:
        raise UserError(f"--batch_size {cfg.batch_size} (global) does not divide over {dist.world_size} "
                        "processes; pick a multiple of the world size")
    if cfg.batch_size // cfg.accu_iter < 2:
        raise UserError(f"--accu_iter {cfg.accu_iter} leaves micro-batches of {cfg.batch_size // cfg.accu_iter} "
                        "image(s) (a contrastive loss needs negatives, BN two samples); lower --accu_iter")
    if (cfg.batch_size // dist.world_size) % cfg.accu_iter:
        raise UserError(f"--batch_size {cfg.batch_size} over {dist.world_size} process(es) is "
                        f"{cfg.batch_size // dist.world_size} images a process, which --accu_iter {cfg.accu_iter} does "
                        "not divide into equal micro-batches; pick a batch size or --accu_iter that does")
    if cfg.precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device; use --precision bf16 or fp32 on CPU")
    if use_sync_bn(cfg, dist, device) and device.type != "cuda":
        raise UserError("--sync_bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU); "
                        "drop it or pass --no-sync_bn")


def use_sync_bn(cfg: Namespace, dist: DistInfo, device: torch.device) -> bool:
    """SyncBatchNorm across ranks: --sync_bn, by default on for multi-GPU runs; never for one process."""
    return dist.enabled and (cfg.sync_bn if cfg.sync_bn is not None else device.type == "cuda")


def build_loader(cfg: Namespace, split: Split, dist: DistInfo, device: torch.device):
    """The pretraining loader with the method's view recipe; returns (loader, things to set_epoch on)."""
    blur = cfg.blur if cfg.blur is not None else default_blur(split.image_size)
    views = METHODS[cfg.clr].views(cfg.n_views, blur)
    return pretrain_loader(split, views, cfg.batch_size, cfg.seed, dataset_name=cfg.dataset_name, rank=dist.rank,
                           world_size=dist.world_size, workers=cfg.workers, device=device, faster=cfg.faster_version,
                           jitter_strength=cfg.color_jitter_strength, min_crop_scale=cfg.min_crop_scale,
                           skip_bad_images=bool(cfg.skip_bad_images), pipeline=cfg.input_pipeline,
                           decode_on_gpu=bool(cfg.decode_on_gpu))


def cifar_stem_of(cfg: Namespace, split: Split) -> bool:
    return cifar_stem_for(cfg.cifar_stem, split.image_size)


def build_model(cfg: Namespace, split: Split, dist: DistInfo, device: torch.device):
    """The method on its device (SyncBatchNorm across GPUs, NHWC unless --no-channels_last)."""
    method = build_method(cfg, num_data=len(split.dataset), cifar_stem=cifar_stem_of(cfg, split))
    if use_sync_bn(cfg, dist, device):
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    # on unless --no-channels_last (older runs saved None)
    memory_format = torch.channels_last if cfg.channels_last is not False else torch.contiguous_format
    return method.to(device, memory_format=memory_format), memory_format


def warm_start(method: nn.Module, path: str, head: bool, arch: str = "") -> None:
    """--from_pretrained: a new run starts from the backbone (and with ``head`` the projector) of another run's
    checkpoint, a run directory or an export; another architecture, stem or width is refused with one line."""
    from models.pretrained import describe, read_weights

    try:
        weights, projector, meta = read_weights(path)  # one read (and checksum) of the file for both
    except CheckpointError as err:
        raise UserError(f"--from_pretrained: {err}") from err
    own = method.backbone.state_dict()
    if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in own.items()}:
        mine = describe("", own, 1.0)  # only to word the error
        stem = "CIFAR" if meta["cifar_stem"] else "ImageNet"
        my_stem = "CIFAR" if mine["cifar_stem"] else "ImageNet"
        raise UserError(f"--from_pretrained {path} holds a {meta['arch']} backbone ({stem} stem, width "
                        f"{meta.get('width_multiplier', 1.0):g}, {meta['feat_dim']}-d features) that does not fit this "
                        f"run's {arch} ({my_stem} stem, {mine['feat_dim']}-d features); pass the same --arch, "
                        "--cifar_stem and --width_multiplier")
    method.backbone.load_state_dict(weights, strict=True)
    loaded = "backbone"
    if head:
        if not projector:
            raise UserError(f"--from_pretrained_head: {path} holds no projector (an export keeps the backbone only); "
                            "pass a run directory or checkpoint, or drop --from_pretrained_head")
        try:
            method.projector.load_state_dict(projector, strict=True)
        except RuntimeError as err:
            raise UserError(f"--from_pretrained_head: the projector of {path} does not fit this run's "
                            f"({str(err).splitlines()[0][:120]}); pass the same projector flags or drop "
                            "--from_pretrained_head") from err
        loaded = "backbone and projector"
    print(f"warm start: {loaded} from {meta.get('source', path)} ({meta['arch']}, epoch {meta.get('epoch')})",
          flush=True)


def wrap_model(method: nn.Module, cfg: Namespace, dist: DistInfo, device: torch.device) -> nn.Module:
    """DDP across ranks, then torch.compile when asked; the unwrapped method stays what is saved."""
    model = method
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return torch.compile(model) if cfg.compile else model


def train_epoch(trainer: Trainer, loader, epoch: int, steps: int, run: RunFiles, start: int = 0,
                meter: Meter | None = None, monitor: KnnMonitor | None = None) -> dict:
    """Steps ``start`` to ``steps`` of one epoch with a progress bar and windowed logs; returns the epoch's
    record. Saves mid-epoch when the ranks agree to (timer), and saves then raises ``Preempted`` on a signal
    (at the epoch's last step the epoch-end checkpoint serves: ``record["stop"]``)."""
    cfg = run.cfg
    trainer.model.train()
    epoch_meter, window = meter or Meter(), Meter()
    bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not run.dist.is_main,
               dynamic_ncols=True, leave=True, file=sys.stdout)
    t_epoch = t_window = time.perf_counter()
    first = trainer.step - start  # the epoch's first step, also when it resumes inside the epoch
    lr_max = float(trainer.schedule[first:first + steps].max())
    for i, (views, index) in enumerate(loader, start=start):
        if i >= steps:
            break
        lr = trainer.lr
        logging_step = window.count + 1 == cfg.log_every_n_steps or i == steps - 1
        logs = trainer.train_step(views, index, epoch, i, diagnose=logging_step and cfg.diagnostics)
        epoch_meter.add(logs)
        window.add(logs)
        bar.update(1)
        if logging_step:
            now = time.perf_counter()
            ips = window.count * cfg.batch_size / max(now - t_window, 1e-9)
            values = window.means()
            trainer.watch_collapse(values, run.dist.is_main)
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}")
            run.scalars({**values, "lr": lr, "images_per_s": ips}, trainer.step)
            window = Meter()
            t_window = now
        if monitor is not None and cfg.eval_every_n_steps and trainer.step % cfg.eval_every_n_steps == 0:
            measured = measure(trainer, monitor, run)  # every rank: the features are sharded
            if run.dist.is_main:
                tqdm.write(f"step {trainer.step}: {measured} on the test split")
            t_window = time.perf_counter()  # the evaluation is not training time
        if (trainer.stop_now or trainer.save_now) and i < steps - 1:
            path = run.save(trainer, epoch, i + 1, epoch_meter)
            if trainer.stop_now:
                bar.close()
                raise Preempted(f"stopped by {trainer.requests.received or 'a signal on another rank'} at epoch "
                                f"{epoch + 1}, step {i + 1} of {steps}, after saving {path}; continue with "
                                f"--log_dir {run.dir} --train_from latest")
    bar.close()
    epoch_time = time.perf_counter() - t_epoch
    return {"epoch": epoch + 1, "step": trainer.step, **epoch_meter.means(),
            "lr": float(trainer.schedule[min(trainer.step, len(trainer.schedule)) - 1]), "lr_max": lr_max,
            "epoch_time_s": epoch_time, "images_per_s": (steps - start) * cfg.batch_size / epoch_time,
            "stop": trainer.stop_now, "save": trainer.save_now}


class HeldOutCheck:
    """--valid_size: on the held-out images (two views each, the same views every time), how often the positive
    is the highest logit of its anchor (top-1) or among the five highest (top-5), and the InfoNCE, with the
    method's projections and this run's temperature, in eval mode and without gradients (as sthalles/SimCLR's
    validation). Each rank scores its share; the counts are summed over ranks."""

    def __init__(self, cfg: Namespace, held: Split, dist: DistInfo, device: torch.device) -> None:
        batch = min(cfg.batch_size, len(held.dataset)) // dist.world_size * dist.world_size
        if batch < 2 * dist.world_size:
            raise UserError(f"--valid_size {cfg.valid_size} holds out {len(held.dataset)} image(s), too few for a "
                            f"contrastive check over {dist.world_size} process(es); raise --valid_size")
        sub = derive(cfg, batch_size=batch, n_views=2)
        self.loader, self.setters = build_loader(sub, held, dist, device)
        self.device, self.temperature = device, cfg.temperature
        self.cosine = cfg.similarity == "cosine"

    @torch.no_grad()
    def __call__(self, method: nn.Module) -> dict:
        from losses import contrastive_logits, infonce_loss

        for target in self.setters:
            target.set_epoch(0)
        method.eval()
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # top-1, top-5, loss x anchors, anchors
        for views, _ in self.loader:
            views = [v.to(self.device, non_blocking=True) for v in views[:2]]
            logits = contrastive_logits(method.embed(views).float(), 2, self.temperature, cosine=self.cosine)
            above = (logits.neg > logits.pos[:, :1]).sum(dim=1)  # negatives that beat the positive
            sums[:3] += torch.stack([(above == 0).sum(), (above < 5).sum(), infonce_loss(logits) * len(above)])
            sums[3] += len(above)  # a host number added in place: no tensor made from it each batch
        top1, top5, loss, n = all_reduce_sum(sums).tolist()
        return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n}


def measure(trainer: Trainer, monitor: KnnMonitor | None, run: RunFiles, record: dict | None = None) -> str:
    """The kNN monitor (when given) and the online probe (when on) on the test split, from one extraction of its
    features: logged under ``monitor/``, added to ``record``; returns what to print."""
    backbone, probe, values = trainer.method.backbone, trainer.probe, {}
    test = None
    if monitor is not None:
        values["knn_top1"], test = monitor.measure(backbone)
    if probe is not None:
        test = test or extract_features(backbone, probe.test, trainer.device, 512, run.cfg.workers, show=False)
        values["probe_top1"] = probe.score(*test)
    trainer.model.train()
    run.scalars(values, trainer.step, prefix="monitor")
    if record is not None:
        record.update(values)
    names = {"knn_top1": "kNN top-1", "probe_top1": "online probe top-1"}
    return ", ".join(f"{names[k]} {v:.2f}%" for k, v in values.items())


def end_epoch(trainer: Trainer, record: dict, run: RunFiles, monitor: KnnMonitor | None, last_epoch: int,
              validator: "HeldOutCheck | None" = None) -> None:
    """kNN monitor, metrics line, and (every --save_every_n_epochs, at the end, or when stopping) the
    checkpoint and curves; raises ``Preempted`` after that save when a signal asked to stop."""
    cfg, completed, stop, asked = run.cfg, record["epoch"], record.pop("stop"), record.pop("save")
    knn_due = monitor is not None and cfg.eval_every_n_epochs and completed % cfg.eval_every_n_epochs == 0
    if (knn_due or trainer.probe is not None) and not stop:
        measured = measure(trainer, monitor if knn_due else None, run, record)
        if run.dist.is_main:
            tqdm.write(f"epoch {completed}: {measured} on the test split")
    if validator is not None and completed % cfg.valid_every_n_epochs == 0 and not stop:
        values = validator(trainer.method)
        trainer.model.train()
        record.update({f"valid_{k}": v for k, v in values.items()})
        run.scalars(values, trainer.step, prefix="valid")
        if run.dist.is_main:
            tqdm.write(f"epoch {completed}: held-out contrastive top-1 {values['top1']:.2f}%, top-5 "
                       f"{values['top5']:.2f}%, loss {values['loss']:.4f}")
    due = completed % cfg.save_every_n_epochs == 0 or completed in (cfg.epochs, last_epoch) or stop or asked
    path = run.save(trainer, completed) if due else None

    def log() -> None:
        run.metrics.append(record)
        if due:
            plot_curves(run.metrics.read(), os.path.join(run.dir, "curves.png"),
                        f"{METHODS[cfg.clr].display_for(cfg)} {cfg.arch} on {cfg.dataset_name}, batch {cfg.batch_size}")

    if run.dist.is_main:  # after the checkpoint's write, by the same thread: no record of an epoch it failed
        run.writes.submit(log)
    if due and stop and completed < last_epoch:
        raise Preempted(f"stopped by {trainer.requests.received or 'a signal on another rank'} at the end of "
                            f"epoch {completed}, after saving {path}; continue with --log_dir {run.dir} "
                            "--train_from latest")

