"""The checkpoint file format: names, the verified read, atomic writes with a checksum, backbone extraction,
and the layouts of the original FlatCLR and MetaContrastive code. The one module that calls ``torch.load``.

One naming scheme: ``checkpoint_{E:04d}.pth.tar`` after E completed epochs, and
``checkpoint_{E:04d}_step{k:06d}.pth.tar`` k steps into epoch E + 1; they order by (E, k).

Every file this tool writes (checkpoints, exports, an evaluation's saved position) gets ``<file>.sha256``
beside it, and every read of such a file checks it first. A file without one (another tool's, or this tool's
from before checksums) is read with ``weights_only=True`` and a note says so once. Nothing here ever unpickles
arbitrary objects, and no message repeats torch's advice to do so.

Importable by models/ without engine/: ``models.pretrained`` (and through it ``torch.hub``) reads here too.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import os
import pickle
import re
import shutil
import sys
import tempfile

import torch

from common.distributed import launched_rank
from common.errors import UserError
from models.backbones import BLOCKS

CKPT_RE = re.compile(r"checkpoint_(\d{4,})(?:_step(\d{6,}))?\.pth\.tar$")
# MetaContrastive's checkpoints hold their argparse hyper-parameters: a plain container, allowed in weights_only
# loads (which refuse arbitrary objects).
torch.serialization.add_safe_globals([argparse.Namespace])
FLATCLR_MODELS = {f"res{d}": f"resnet{d}" for d in (18, 34, 50, 101, 152)}
# What a checkpoint of this tool holds besides its weights: without them an evaluation would fall back to
# defaults (another dataset, another architecture) instead of saying the file is not one of this tool's.
REQUIRED_ARGS = ("clr", "arch", "dataset_name")
_told: set[str] = set()


class CheckpointError(UserError):
    """A file that is not a usable checkpoint (corrupt, unsafe, not this tool's): one line saying which and why."""


# ----------------------------------------------------------------------------- names
def checkpoint_name(epoch: int, batch: int = 0) -> str:
    """``epoch`` epochs completed and ``batch`` steps done of the next one (0: an epoch-end checkpoint)."""
    return f"checkpoint_{epoch:04d}.pth.tar" if batch == 0 else f"checkpoint_{epoch:04d}_step{batch:06d}.pth.tar"


def all_checkpoints(run_dir: str) -> dict[tuple[int, int], str]:
    """{(epochs completed, steps into the next epoch): path} of every checkpoint in ``run_dir``, in order."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(run_dir), "checkpoint_*.pth.tar")):
        m = CKPT_RE.search(os.path.basename(path))
        if m and os.path.isfile(path):
            found[(int(m.group(1)), int(m.group(2) or 0))] = path
    return dict(sorted(found.items()))


def list_checkpoints(run_dir: str) -> dict[int, str]:
    """{epoch: path} of the epoch-end checkpoints in ``run_dir`` (what evaluation reads)."""
    return {epoch: path for (epoch, batch), path in all_checkpoints(run_dir).items() if batch == 0}


def latest_epoch_end(run_dir: str) -> str:
    """The newest epoch-end checkpoint of ``run_dir``; one line when there is none."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint_NNNN.pth.tar in {run_dir}; pass a pretraining run directory, a "
                              "checkpoint or an export")
    return found[max(found)]


# ----------------------------------------------------------------------------- writing
def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once, at import, before any thread that creates files runs


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


RESUME_FIX = "make room, then resume with --train_from latest"


def atomic_save(obj, path: str, fix: str = RESUME_FIX) -> None:
    """Temp file in the same directory, fsync, rename; then ``<path>.sha256`` with the file's checksum, which
    every read verifies. The file gets the mode of the run's other files (mkstemp would leave it 0600). A full
    disk or any other OSError is one line: the file, the space it needs, and ``fix``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth.tar", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        digest = sha256(tmp)
        if os.path.exists(path + ".sha256"):  # a replaced file's old checksum must not outlive it
            os.remove(path + ".sha256")
        os.replace(tmp, path)
        _write_text_atomically(path + ".sha256", f"{digest}  {os.path.basename(path)}\n")
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = err if isinstance(err, OSError) else err.__context__  # torch.save wraps ENOSPC in a RuntimeError
        if isinstance(err, (OSError, RuntimeError)) and isinstance(cause, OSError):
            try:
                free = f"{shutil.disk_usage(directory).free / 2**20:,.0f} MiB are free there"
            except OSError:
                free = "the directory cannot be read"
            raise UserError(f"could not write checkpoint {path} ({cause.strerror or cause}); it needs about "
                            f"{_nbytes(obj) / 2**20:,.0f} MiB and {free}: {fix}") from err
        raise


def _nbytes(obj) -> int:
    """Bytes of the tensors in a nested checkpoint dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _write_text_atomically(path: str, text: str) -> None:
    tmp = f"{os.path.dirname(os.path.abspath(path))}/.tmp_{os.path.basename(path)}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def remove_checkpoint(path: str) -> None:
    for p in (path, path + ".sha256"):
        if os.path.exists(p):
            os.remove(p)


# ----------------------------------------------------------------------------- reading
def verify(path: str) -> bool:
    """Checks ``path`` against its ``.sha256``; False when it has none."""
    sidecar = path + ".sha256"
    if not os.path.isfile(sidecar):
        return False
    with open(sidecar) as f:
        words = f.read().split()
    if sha256(path) != (words[0] if words else ""):
        raise CheckpointError(f"checkpoint {path} is corrupt: its content does not match the checksum in {sidecar}; "
                              "resume from an earlier checkpoint")
    return True


def read_file(path: str, check: bool = True, mmap: bool = True):
    """The object in ``path``, read with ``weights_only=True`` after its checksum (``check``). The tensors are
    mapped from the file (copy-on-write: writing to them never reaches it) unless ``mmap`` is False or the file
    is of torch's legacy format. Any failure is one :class:`CheckpointError` line."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist; pass a run directory, a checkpoint_*.pth.tar or an export")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if check:
        verify(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:  # a file of torch's legacy (pre-zip) format cannot be mapped
            if not mmap or "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError,
            ImportError, KeyError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights" in first.lower() or "unpickl" in first.lower() or "global" in first.lower():
            first = "it holds objects other than tensors and plain values, which are never unpickled here"
        raise CheckpointError(f"cannot load checkpoint {path}: {first[:200]}; it is corrupt or was not written by "
                              "this tool (only tensors and plain values are read)") from err


def _note_unchecked(path: str) -> None:
    """Once per file, after it was read: it had no checksum to check."""
    if not os.path.isfile(path + ".sha256") and path not in _told and launched_rank() == 0:
        _told.add(path)
        print(f"note: {path} has no .sha256 beside it (another tool's file, or one from before checksums); read "
              "without a checksum, tensors and plain values only", file=sys.stderr)


def read_checkpoint(path: str, check: bool = True) -> dict:
    """A checkpoint of this tool (or the original FlatCLR's or MetaContrastive's, mapped to this layout), read by
    :func:`read_file`; ``check=False`` skips the checksum (the ranks of a resume other than rank 0, which
    verifies for all of them)."""
    state = read_file(path, check)
    if isinstance(state, dict) and not isinstance(state.get("model"), dict):  # FlatCLR's "model" is its arch name
        try:
            state = foreign_checkpoint(state, path) or state
        except ValueError as err:
            raise CheckpointError(str(err)) from err
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path} is not a checkpoint of this tool (no model state in it); pass one of the "
                              "run's checkpoint_*.pth.tar files")
    if not state.get("foreign"):
        args = state.get("args")
        missing = [k for k in REQUIRED_ARGS if not isinstance(args, dict) or not isinstance(args.get(k), str)]
        if missing or not isinstance(state.get("epoch"), int):
            what = ", ".join(f"args.{k}" for k in missing) or "epoch"
            raise CheckpointError(f"{path} is not a checkpoint of this tool (it lacks {what}); pass one of the "
                                  "run's checkpoint_*.pth.tar files")
    if check:
        _note_unchecked(path)
    return state


def read_export(path: str) -> dict:
    """An export's backbone state dict (``RUN/export/*.pth``): tensors only."""
    weights = read_file(path)
    if not isinstance(weights, dict) or not weights or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise CheckpointError(f"{path} is not an export of this tool (a backbone state dict); pass a run directory, "
                              "a checkpoint or an export .pth")
    _note_unchecked(path)
    return weights


# ----------------------------------------------------------------------------- layouts
def backbone_weights(model_state: dict) -> dict[str, torch.Tensor]:
    """The ``backbone.`` entries of a method's state dict, without the prefix."""
    return {k[len("backbone."):]: v for k, v in model_state.items() if k.startswith("backbone.")}


def arch_of(weights: dict[str, torch.Tensor]) -> str | None:
    """The ResNet whose blocks these backbone weights have (counted per stage), or None."""
    bottleneck = any(k.endswith(".conv3.weight") for k in weights)
    counts = [len({k.split(".")[1] for k in weights if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    for name, (block, layers) in BLOCKS.items():
        if layers == counts and (block.expansion == 4) == bottleneck:
            return name
    return None


def foreign_checkpoint(state: dict, path: str) -> dict | None:
    """A checkpoint written by the original FlatCLR code (``model_state_dict``: its torchvision-style ResNet
    with the projection head as ``fc`` and an input ``normalize`` module, ``module.`` prefixes under
    DataParallel) or by MetaContrastive (``state_dict`` of its encoder: ``convnet.`` backbone, ``projection.``
    head, ``hparams``), as this tool's layout: the backbone only (their heads, optimizers and schedules are not
    used). None for anything else. Says once per file what was mapped."""
    if not isinstance(state, dict):
        return None
    if isinstance(state.get("model_state_dict"), dict):
        layout, raw = "FlatCLR", state["model_state_dict"]
        raw = {k[len("module."):] if k.startswith("module.") else k: v for k, v in raw.items()}
        weights = {k: v for k, v in raw.items() if not k.startswith(("fc.", "normalize."))}
        arch = FLATCLR_MODELS.get(str(state.get("model"))) or arch_of(weights)
        m = CKPT_RE.search(os.path.basename(path))
        epoch = int(m.group(1)) if m else int(state.get("epoch") or 0)
        dropped = "its projection head (fc) and input normalisation (this tool normalises with the dataset's stats)"
    elif isinstance(state.get("state_dict"), dict) and any("convnet." in k for k in state["state_dict"]):
        layout, raw = "MetaContrastive", state["state_dict"]
        raw = {k[k.index("convnet."):]: v for k, v in raw.items() if "convnet." in k}
        weights = {k[len("convnet."):]: v for k, v in raw.items() if not k.startswith("convnet.fc.")}
        hparams = state.get("hparams")
        arch = str(getattr(hparams, "arch", "")).lower() or arch_of(weights)
        epoch = int(state.get("iter") or 0)
        dropped = "its projection head and rotation head"
    else:
        return None
    if arch not in BLOCKS:
        raise ValueError(f"{path} is a {layout} checkpoint of a backbone this tool does not build ({arch})")
    if ("mapped", path) not in _told and launched_rank() == 0:
        _told.add(("mapped", path))
        print(f"note: {path} is a {layout} checkpoint: mapped its {arch} backbone ({len(weights)} tensors) onto "
              f"this tool's; {dropped}, optimizer and schedule are not used", file=sys.stderr)
    return {"model": {f"backbone.{k}": v for k, v in weights.items()}, "arch": arch, "epoch": epoch,
            "width_multiplier": 1.0, "foreign": layout, "args": {"arch": arch, "clr": layout.lower()}}
