"""Several runs' t-SNEs side by side, as UnsupervisedLearningCodes (seed 001) draws them: one panel per run, each
titled with its method and settings, of the test features of its last checkpoint.

    python -m experiments.tsne_compare RUN1 RUN2 [RUN3 ...] [--layer backbone|projection] [--out tsne.png]

The test split is each run's own dataset (from its config.yaml; --data overrides the root). With --layer
projection the features are the projection head's output (the seed's "FC" t-SNE).
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.errors import UserError, first_line  # noqa: E402


def _title(cfg: dict, epoch: int) -> str:
    method = cfg.get("clr", "?")
    extra = {"simclr": f"t={cfg.get('temperature')}", "flatclr": f"t={cfg.get('temperature')}",
             "insdis": f"t={cfg.get('temperature')}, {cfg.get('insdis_loss')}",
             "byol": f"m={cfg.get('byol_base_momentum')}"}.get(method, "")
    head = f", head {cfg['head']}" if cfg.get("head") not in (None, "contrastive") else ""
    return (f"{method}{head} ({extra}), {cfg.get('arch')}, batch {cfg.get('batch_size')}, epoch {epoch}\n"
            f"{os.path.basename(os.path.normpath(cfg['_run']))}")


def _read_run(run: str) -> tuple[dict, int, str]:
    """(settings, last epoch, its checkpoint) of a run directory, or one line saying why it is not one."""
    import yaml

    from engine.checkpoint import list_checkpoints

    if not os.path.isdir(run):
        what = "is not a directory" if os.path.exists(run) else "does not exist"
        raise UserError(f"{run} {what}; pass run directories (results/<dataset>/<bs>_<Method>/<date>)")
    config = os.path.join(run, "config.yaml")
    checkpoints = list_checkpoints(run)  # the directory's name taken literally: run[1] is a name, not a pattern
    if not os.path.isfile(config) or not checkpoints:
        raise UserError(f"{run} is not a run with checkpoints (config.yaml and checkpoint_NNNN.pth.tar)")
    try:
        with open(config, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        raise UserError(f"{config} is not readable yaml ({first_line(err)}); restore it from the run's checkpoint "
                        "(its 'args')") from err
    if not isinstance(cfg, dict) or not isinstance(cfg.get("dataset_name"), str):
        raise UserError(f"{config} is not a run's settings (no dataset_name); restore it from the run's checkpoint "
                        "(its 'args')")
    epoch = max(checkpoints)
    return {**cfg, "_run": run}, epoch, checkpoints[epoch]


def _load(loader, path: str):
    """``loader(path)``; a file it cannot read is one line naming it (the loaders' own errors already are)."""
    try:
        return loader(path)
    except UserError:
        raise
    except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(f"cannot load {path} ({first_line(err)[:200]}); pass runs whose checkpoints are intact") \
            from err


def compare(runs: list[str], layer: str, out: str, data: str | None, seed: int = 0, max_points: int = 1000) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.backend_bases import FigureCanvasBase

    from data.datasets import load_split
    from engine.plots import tsne_scatter
    from engine.records import class_names
    from engine.knn import extract_features
    from models.pretrained import load_pretrained, load_projector

    if os.path.isdir(out):
        raise UserError(f"--out {out} is a directory; pass the PNG file to write, e.g. {os.path.join(out, 'tsne.png')}")
    kind = os.path.splitext(out)[1][1:].lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if kind not in formats:
        raise UserError(f"--out {out}: matplotlib does not write .{kind} files; end it in .png (or "
                        f"{', '.join('.' + k for k in sorted(formats) if k != 'png')})")
    checked = [_read_run(run) for run in runs]  # every run checked before the first is drawn
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 5.2), squeeze=False)
    try:
        for ax, (cfg, epoch, path) in zip(axes[0], checked):
            run = cfg["_run"]
            backbone, meta = _load(load_pretrained, path)
            test = load_split(cfg["dataset_name"], data or cfg.get("data", "./datasets"), train=False,
                              image_size=meta.get("image_size") or cfg.get("image_size"))
            x, y = extract_features(backbone, test, torch.device("cpu"), 256, 0, f"test features of {run}")
            if layer == "projection":
                projector = _load(load_projector, path)
                with torch.no_grad():
                    x = projector(x)
            names = class_names(test)
            tsne_scatter(ax, x, y, names, seed, max_points, point_size=5)
            ax.set_title(_title(cfg, epoch), fontsize=9)
        if len(names) <= 20:
            axes[0][-1].legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
        fig.suptitle(f"t-SNE of the test {layer} features")
        fig.tight_layout()
        _save(fig, out)
    finally:
        plt.close(fig)
    return out


def _save(fig, out: str) -> None:
    """The PNG, written whole or not at all, and only its own directory created; one line when it cannot be."""
    parent = os.path.dirname(os.path.abspath(out))
    made = parent  # the outermost directory this call creates (none when ``parent`` exists)
    while not os.path.exists(os.path.dirname(made)):
        made = os.path.dirname(made)
    made = None if os.path.exists(made) else made
    tmp = os.path.join(parent, "." + os.path.basename(out) + ".tmp")
    try:
        os.makedirs(parent, exist_ok=True)
        fig.savefig(tmp, dpi=100, format=os.path.splitext(out)[1][1:].lower() or "png")
        os.replace(tmp, out)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if made is not None and os.path.isdir(made):
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(err, OSError):
            raise UserError(f"could not write {out} ({first_line(err)}); pass an --out you can write to") from err
        raise


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other mistake here
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--layer", default="backbone", choices=["backbone", "projection"])
    p.add_argument("--out", default="tsne_compare.png")
    p.add_argument("--data", default=None, help="dataset root (default: each run's --data)")
    args = p.parse_args(argv)
    try:
        path = compare(args.runs, args.layer, args.out, args.data)
    except (UserError, ValueError, FileNotFoundError) as err:  # a bad run, file or value: one line, no traceback
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    print(f"side-by-side t-SNE: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
