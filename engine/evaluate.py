"""Evaluation of pretrained backbones: ``--train_mode=eval``, one protocol per ``--transfer_mode``.

* ``knn``: weighted k-nearest neighbours on L2-normalised backbone features (engine/knn.py).
* ``linear_eval``: a linear classifier on the frozen backbone. The fast path extracts features once
  (deterministic test-time transform), standardises them and trains on the cached tensors; with
  ``--fc_augment`` it trains through the frozen backbone on freshly augmented images each epoch
  (SimCLR's protocol: random resized crop + flip, BN without affine before the linear layer).
* ``finetune``: the whole network, with augmentation (SimCLR appendix B.5).
* ``--semi_ratio``: fine-tune/probe on a class-balanced, seeded subset of the labels, saved in the
  run so every checkpoint sees the same images (ImageNet: the standard 1%/10% lists when present).

This module runs an evaluation; its rooms: the protocols (engine/protocols.py: ``PROTOCOLS`` maps each
``--transfer_mode`` to its function), the fitting (engine/fitting.py), the records (engine/records.py) and the
pictures (engine/plots.py).

Each result is a json record ``RUN/eval/<mode>[_semi<ratio>]_epoch<N>.json`` naming the data it measured (dataset,
absolute data root, image counts); an evaluation on other data than the run's own puts a data tag in the names of
the files it writes, so that one run evaluated on several data sets keeps a record of each (``records_data_tag``).
"""
from __future__ import annotations

import json
import math
import os
from argparse import Namespace

import torch

from common.device import pick_device
from common.provenance import provenance
from common.distributed import DistInfo, barrier, broadcast_object, init_distributed
from common.settings import derive
from common.errors import UserError
from data import load_split
from data.datasets import Split, fixed_subset
from engine import checkpoint as ckpt_io
from engine.knn import extract_features, topk_correct
from engine.runlog import new_run_dir, take_back
from engine.records import (BASELINES, class_names, mode_tag, measured_data, partial_path, record_file,
                            records_data_tag, trains_through)
from engine.protocols import EvalJob, PROTOCOLS, fit_pca, load_backbone
from engine.plots import plot_accuracy_vs_epoch, plot_tsne
from engine.fitting import semi_subset
from engine.stop import StopRequests
from models.backbones import cifar_stem_for


def eval_defaults(cfg: Namespace) -> Namespace:
    """``cfg`` with the settings of an evaluation that depend on its protocol: the classifier's lr scales with
    its batch."""
    if cfg.fc_lr is None:
        return derive(cfg, fc_lr=(0.05 if cfg.transfer_mode == "finetune" else 0.1) * cfg.fc_batch_size / 256)
    return cfg


def select_checkpoints(cfg: Namespace) -> list[tuple[int, str | None]]:
    """[(epoch, path)] to evaluate; [(0, None)] for a baseline (random init, or PCA of the pixels)."""
    if cfg.checkpoint_dir.lower() in BASELINES:
        return [(0, None)]
    available = ckpt_io.list_checkpoints(cfg.checkpoint_dir)
    if cfg.eval_all:
        return list(available.items())
    if cfg.transfer_from_epoch is not None:
        if cfg.transfer_from_epoch not in available:
            have = ", ".join(map(str, available)) or "none"
            raise UserError(f"no checkpoint for epoch {cfg.transfer_from_epoch} in {cfg.checkpoint_dir} "
                            f"(epochs available: {have}); pass one of those to --transfer_from_epoch")
        return [(cfg.transfer_from_epoch, available[cfg.transfer_from_epoch])]
    last = max(available)
    return [(last, available[last])]


def evaluate(cfg: Namespace) -> list[dict]:
    """Run the evaluation ``cfg`` describes; returns the result records (also written as json). An evaluation
    that fails takes back the files it wrote."""
    device = pick_device(cfg.device)
    dist = init_distributed(device.type)
    chosen = select_checkpoints(cfg)
    skip = bool(cfg.skip_bad_images)
    train = load_split(cfg.dataset_name, cfg.data, train=True, download=cfg.download, image_size=cfg.image_size,
                       skip_bad_images=skip)
    test = load_split(cfg.dataset_name, cfg.data, train=False, download=cfg.download, image_size=train.image_size,
                      skip_bad_images=skip)
    if cfg.eval_train_subset is not None:
        train = fixed_subset(train, cfg.eval_train_subset, cfg.subset_seed, "eval_train_subset")
    random_init = chosen[0][1] is None
    cfg = fit_batch_for(cfg, len(train.dataset), dist.world_size, dist.is_main)
    if cfg.fc_iters:  # classifier steps (MetaContrastive's eval --iters), in whole epochs
        n = len(train.dataset) if cfg.semi_ratio is None else max(1, round(cfg.semi_ratio * len(train.dataset)))
        bs = min(cfg.fc_batch_size, n)
        steps = max(1, n // bs) if trains_through(cfg) else math.ceil(n / bs)  # the fit's loader drops a remainder
        cfg = derive(cfg, fc_epochs=max(1, math.ceil(cfg.fc_iters / steps)))
    planned = cfg.eval_dir or (None if random_init else os.path.join(cfg.checkpoint_dir, "eval"))
    resume = interrupted_fit(cfg, chosen, planned) if cfg.train_from is not None else None
    created = planned is None or not os.path.isdir(planned)
    out_dir = _output_dir(cfg, dist, random_init)
    board = os.path.join(out_dir, "tensorboard")
    before = set(os.listdir(board)) if os.path.isdir(board) else set()
    try:
        with StopRequests(cfg) as requests:
            return _evaluate(cfg, dist, device, chosen, train, test, out_dir, requests, resume)
    except BaseException:
        if dist.is_main:  # results already written for earlier checkpoints stay; this run's events file goes
            take_back(board, before, created=not before)
            if created and not os.listdir(out_dir):  # a fresh baseline directory goes whole, with its parents
                take_back(out_dir if planned is not None else os.path.dirname(out_dir), None, True,
                          os.path.dirname(planned) if planned is not None else cfg.results_dir,
                          only_if_empty=planned is not None)
        raise


MIN_FIT_STEPS = 20  # optimiser steps an epoch below which a default --fc_batch_size is lowered


def fit_batch_for(cfg: Namespace, images: int, world_size: int = 1, show: bool = True) -> Namespace:
    """``cfg`` with a classifier batch that makes at least MIN_FIT_STEPS steps an epoch on ``images`` labelled
    images (of which ``--semi_ratio``), for a fit through the backbone (fine-tuning, ``--fc_augment``) whose
    --fc_batch_size was left at its default (SimCLR's 4096 is one step an epoch on a small data set, and such
    epochs are few and costly): the largest power of two that does, at least 16 (but no more than the images) and 2
    a process, and fc_lr (unless
    given) scaled by the square root of the batch ratio (SimCLR's rule for small batches, --learning_rate_scaling
    sqrt). A probe on cached features keeps its batch: its full-batch steps are cheap and its epochs many. Said in
    one line; the record holds both."""
    given = getattr(cfg, "sources", None) or {}
    if not trains_through(cfg) or "fc_batch_size" in given:
        return cfg
    n = images if cfg.semi_ratio is None else max(1, round(cfg.semi_ratio * images))
    if n // cfg.fc_batch_size >= MIN_FIT_STEPS:
        return cfg
    batch = max(16, 2 * world_size, 2 ** max(0, (n // MIN_FIT_STEPS).bit_length() - 1))
    batch = max(2 * world_size, min(batch, 2 ** (n.bit_length() - 1)))  # a fit through the backbone drops the
    # remainder of an epoch: never a batch larger than the labelled images
    if batch >= cfg.fc_batch_size:
        return cfg
    lr = cfg.fc_lr if "fc_lr" in given else cfg.fc_lr * math.sqrt(batch / cfg.fc_batch_size)
    if show:
        print(f"note: {n} labelled images make {n // cfg.fc_batch_size} step(s) an epoch at --fc_batch_size "
              f"{cfg.fc_batch_size}; fitting with batch {batch} and fc_lr {lr:.4g}"
              f"{'' if 'fc_lr' in given else ' (sqrt-scaled)'} instead, "
              f"{n // batch} steps an epoch; pass --fc_batch_size to choose", flush=True)
    return derive(cfg, fc_batch_size=batch, fc_lr=lr)


def interrupted_fit(cfg: Namespace, chosen: list[tuple[int, str | None]], out_dir: str | None) -> dict:
    """The saved position that ``--train_from`` in eval mode continues (checked before anything is written)."""
    if cfg.train_from != "latest":
        raise UserError(f"--train_from {cfg.train_from}: in eval mode only 'latest' is understood (it continues "
                        "the interrupted evaluation of the same command)")
    if chosen[0][1] is None:
        raise UserError("--train_from latest: a random-init baseline is not resumable; drop --train_from")
    if not trains_through(cfg):
        raise UserError(f"--train_from latest: --transfer_mode {cfg.transfer_mode} saves no position (only finetune "
                        "and --fc_augment linear_eval do); drop --train_from")
    if len(chosen) > 1:
        raise UserError("--train_from latest continues one checkpoint's evaluation: pass --transfer_from_epoch "
                        "instead of --eval_all")
    path = partial_path(out_dir, cfg, chosen[0][0])
    if not os.path.exists(path):
        raise UserError(f"--train_from latest: there is no interrupted evaluation to continue ({path} does not "
                        "exist); drop --train_from to start it")
    state = ckpt_io.read_file(path)
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict) or "model" not in state:
        raise UserError(f"{path} is not an interrupted evaluation of this tool; delete it to start afresh")
    for key, value in state["settings"].items():
        if getattr(cfg, key, None) != value:
            raise UserError(f"{path} was saved with --{key}={value}, not {getattr(cfg, key, None)}; continue with "
                            f"the same settings, or delete that file to start afresh")
    return state


def _evaluate(cfg: Namespace, dist: DistInfo, device: torch.device, chosen: list, train: Split, test: Split,
              out_dir: str, requests: StopRequests, resume: dict | None) -> list[dict]:
    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
    train_indices = None
    if cfg.semi_ratio is not None:
        train_indices = broadcast_object(semi_subset(train, cfg.semi_ratio, cfg.seed, cfg.data, cfg.dataset_name,
                                                     out_dir, records_data_tag(cfg)) if dist.is_main else None)
    job = EvalJob(cfg, dist, device, train, test, train_indices, out_dir, chosen[0][1] is None, requests, resume)
    cifar_stem = cifar_stem_for(cfg.cifar_stem, train.image_size)
    results = []
    pca = cfg.checkpoint_dir.lower() == "pca"
    for epoch, path in chosen:
        job.epoch = epoch
        torch.manual_seed(cfg.seed)  # first: the random-init baseline's weights come from this seed
        if pca:
            backbone, dim = fit_pca(job, cfg.pca_dim)
        else:
            backbone, dim = load_backbone(path, cfg.arch, cifar_stem, cfg.width_multiplier)
        backbone = backbone.to(device)
        test_x, test_y = extract_features(backbone, test, device, job.batch, cfg.workers, "test features",
                                          dist.is_main)
        scores, fields, test_x = PROTOCOLS[cfg.transfer_mode](job, backbone, dim, test_x)
        top1, top5 = topk_correct(scores, test_y)
        record = {"mode": cfg.transfer_mode, **measured_data(cfg), "data_train_images": len(train.dataset),
                  "data_test_images": len(test.dataset), "checkpoint_epoch": epoch,
                  "checkpoint": path or ("pca" if pca else "random-init"), "arch": f"pca-{dim}" if pca else cfg.arch,
                  "semi_ratio": cfg.semi_ratio,
                  "train_images": len(train_indices) if train_indices is not None else len(train.dataset),
                  "test_images": len(test.dataset), **fields,
                  "top1": 100.0 * top1 / len(test_y), "top5": 100.0 * top5 / len(test_y),
                  "provenance": provenance(device, dist.world_size)}
        results.append(record)
        if dist.is_main:
            _report(cfg, record, out_dir, writer)
            if trains_through(cfg) and os.path.exists(partial_path(out_dir, cfg, epoch)):  # spent once written
                ckpt_io.remove_checkpoint(partial_path(out_dir, cfg, epoch))
    if dist.is_main:
        _finish(cfg, results, out_dir, writer, test, test_x, test_y, chosen[-1][0])
    return results


def _output_dir(cfg: Namespace, dist: DistInfo, random_init: bool) -> str:
    """``--eval_dir``, else ``RUN/eval``; a random-init baseline without ``--eval_dir`` gets a fresh run directory
    of its own."""
    if cfg.eval_dir:
        out_dir = cfg.eval_dir
    elif not random_init:
        out_dir = os.path.join(cfg.checkpoint_dir, "eval")
    else:
        out_dir = None
        if dist.is_main:
            name = f"pca-{cfg.pca_dim}" if cfg.checkpoint_dir.lower() == "pca" else f"random-init-{cfg.arch}"
            out_dir = os.path.join(new_run_dir(cfg.results_dir, cfg.dataset_name, 0, name), "eval")
        out_dir = broadcast_object(out_dir)
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
    barrier()
    return out_dir


def _report(cfg: Namespace, record: dict, out_dir: str, writer) -> None:
    epoch = record["checkpoint_epoch"]
    path = record_file(cfg, record, out_dir)
    tag = os.path.basename(path)[:-len(f"_epoch{epoch:04d}.json")]
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    writer.add_scalar(f"eval/{tag}_top1", record["top1"], epoch)
    writer.add_scalar(f"eval/{tag}_top5", record["top5"], epoch)
    print(f"{tag} epoch {epoch}: top-1 {record['top1']:.2f}%  top-5 {record['top5']:.2f}%  "
          f"({record['test_images']} test images)", flush=True)


def _finish(cfg: Namespace, results: list[dict], out_dir: str, writer, test: Split, test_x: torch.Tensor,
            test_y: torch.Tensor, epoch: int) -> None:
    """t-SNE of the last checkpoint's test features, the accuracy-against-epoch plot, closing lines."""
    if cfg.tsne:
        names = class_names(test)
        layer = cfg.tsne_layer
        if layer == "projection":  # the seed-001 kind: the FC/projection output of the last checkpoint
            from models.pretrained import load_projector

            path = results[-1]["checkpoint"]
            if not os.path.isfile(path):
                raise UserError(f"--tsne_layer projection needs a run's checkpoint, not {path}; use --tsne_layer "
                                "backbone")
            with torch.no_grad():
                test_x = load_projector(path, test_x.device)(test_x)
        png = os.path.join(out_dir, f"tsne_{mode_tag(cfg)}"
                                    f"{'_projection' * (layer == 'projection')}_epoch{epoch:04d}.png")
        plot_tsne(test_x, test_y, names, png, f"t-SNE of test {layer} features ({cfg.transfer_mode}), "
                  f"checkpoint epoch {epoch}", cfg.seed)
        tag = f"test_features_epoch{epoch:04d}"
        taken = [d for d in os.listdir(writer.log_dir)
                 if d.isdigit() and os.path.isdir(os.path.join(writer.log_dir, d, tag))]
        writer.add_embedding(test_x[:2000].cpu(), metadata=[names[int(c)] for c in test_y[:2000]], tag=tag,
                             global_step=len(taken))  # a repeated evaluation adds its own entry, no warning
        print(f"t-SNE: {png}")
    if cfg.eval_all:
        summary = os.path.join(out_dir, f"{mode_tag(cfg)}_all_epochs")
        with open(summary + ".json", "w") as f:
            json.dump(results, f, indent=1)
        plot_accuracy_vs_epoch(results, summary + ".png",
                               f"{cfg.transfer_mode} on {cfg.dataset_name} against pretraining epoch")
        print(f"accuracy against epoch: {summary}.png")
    writer.close()
    print(f"results in {out_dir}")

