"""``--train_mode=export``: a run's backbone as a plain state dict and a json describing it.

    python main.py --train_mode=export --checkpoint_dir RUN [--transfer_from_epoch N]

writes ``RUN/export/<arch>_<method>_ep<N>.pth`` (the backbone alone, ``torch.load(weights_only=True)``; no ``fc``
keys) and ``.json`` beside it (architecture, stem, width, feature dim, normalisation mean/std and image size,
method, dataset, epoch, the checkpoint it came from). ``models.pretrained.load_pretrained`` reads it back.
"""
from __future__ import annotations

import json
import os
from argparse import Namespace


from common.errors import UserError
from data.datasets import load_split
from engine import checkpoint as ckpt_io
from engine.evaluate import select_checkpoints
from engine.records import BASELINES
from models.pretrained import backbone_weights, describe


def input_stats(state: dict, cfg: Namespace) -> dict:
    """The normalisation and image size the backbone was trained with: recorded in the checkpoint since the
    export existed, else read from the dataset (which must then be readable at --data)."""
    stats = state.get("args", {}).get("input_stats")
    if stats:
        return dict(stats)
    try:
        split = load_split(cfg.dataset_name, cfg.data, train=True, download=False, image_size=cfg.image_size)
    except UserError as err:
        raise UserError(f"the checkpoint does not record its normalisation and the dataset cannot be read to find "
                        f"it ({err}); pass --data where {cfg.dataset_name} is") from err
    return {"mean": list(split.mean), "std": list(split.std), "image_size": split.image_size}


def export_run(cfg: Namespace) -> list[str]:
    if cfg.checkpoint_dir.lower() in BASELINES:  # a random-init or PCA baseline: no trained backbone to export
        here = f"; for the run directory {cfg.checkpoint_dir} pass ./{cfg.checkpoint_dir}" \
            if os.path.isdir(cfg.checkpoint_dir) else ""
        raise UserError(f"--train_mode=export needs --checkpoint_dir RUN_DIR (a pretraining run), not "
                        f"{cfg.checkpoint_dir} (an evaluation baseline, with no trained backbone to export){here}")
    written = []
    for epoch, path in select_checkpoints(cfg):
        state = ckpt_io.load_checkpoint(path)
        args = state.get("args", {})
        weights = backbone_weights(state["model"])
        if not weights:
            raise UserError(f"{path} holds no backbone weights; it was not written by this tool's pretraining")
        arch = state.get("arch", args.get("arch"))
        method = args.get("clr", "model")
        meta = describe(arch, weights, float(state.get("width_multiplier") or 1.0), method=method,
                        dataset=args.get("dataset_name"), epoch=epoch, source=os.path.abspath(path),
                        **input_stats(state, cfg))
        out_dir = os.path.join(cfg.checkpoint_dir, "export")
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as err:
            raise UserError(f"could not create {out_dir} ({err.strerror or err}); make the run directory "
                            "writable or make room, then export again") from err
        out = os.path.join(out_dir, f"{arch}_{method}_ep{epoch}.pth")
        ckpt_io.atomic_save({k: v.clone() for k, v in weights.items()}, out,  # with its .sha256, as every file
                            fix="make room, then export again")
        _write_json(meta, os.path.splitext(out)[0] + ".json")
        print(f"exported {path} -> {out} (+ .json): {arch}, {'CIFAR' if meta['cifar_stem'] else 'ImageNet'} stem, "
              f"{meta['feat_dim']}-d features", flush=True)
        written.append(out)
    return written


def _write_json(meta: dict, path: str) -> None:
    """The export's description, written whole or not at all; a failure is one line naming the file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not write {path} ({err.strerror or err}); make room, then export again") from err
