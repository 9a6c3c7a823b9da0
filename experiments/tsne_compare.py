"""Several runs' t-SNEs side by side, as UnsupervisedLearningCodes (seed 001) draws them: one panel per run, each
titled with its method and settings, of the test features of its last checkpoint (or of --epoch N).

    python -m experiments.tsne_compare RUN1 RUN2 [RUN3 ...] [--layer backbone|projection] [--out tsne.png]

The test split is each run's own dataset (from its config.yaml; --data overrides the root). With --layer
projection the features are the projection head's output (the seed's "FC" t-SNE).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.errors import UserError  # noqa: E402


def _title(cfg: dict, epoch: int) -> str:
    method = cfg.get("clr", "?")
    extra = {"simclr": f"t={cfg.get('temperature')}", "flatclr": f"t={cfg.get('temperature')}",
             "insdis": f"t={cfg.get('temperature')}, {cfg.get('insdis_loss')}",
             "byol": f"m={cfg.get('byol_base_momentum')}"}.get(method, "")
    head = f", head {cfg['head']}" if cfg.get("head") not in (None, "contrastive") else ""
    return (f"{method}{head} ({extra}), {cfg.get('arch')}, batch {cfg.get('batch_size')}, epoch {epoch}\n"
            f"{os.path.basename(os.path.normpath(cfg['_run']))}")


def compare(runs: list[str], layer: str, out: str, data: str | None, seed: int = 0, max_points: int = 1000) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import yaml

    from data.datasets import load_split
    from engine.checkpoint import list_checkpoints
    from engine.evaluate import _class_names, tsne_scatter
    from engine.knn import extract_features
    from models.pretrained import load_pretrained, load_projector

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 5.2), squeeze=False)
    for ax, run in zip(axes[0], runs):
        config = os.path.join(run, "config.yaml")
        if not os.path.isfile(config) or not list_checkpoints(run):
            raise UserError(f"{run} is not a run with checkpoints (config.yaml and checkpoint_NNNN.pth.tar)")
        with open(config) as f:
            cfg = yaml.safe_load(f) or {}
        cfg["_run"] = run
        epoch = max(list_checkpoints(run))
        backbone, meta = load_pretrained(run)
        test = load_split(cfg["dataset_name"], data or cfg.get("data", "./datasets"), train=False,
                          image_size=meta.get("image_size") or cfg.get("image_size"))
        x, y = extract_features(backbone, test, torch.device("cpu"), 256, 0, f"test features of {run}")
        if layer == "projection":
            with torch.no_grad():
                x = load_projector(run)(x)
        names = _class_names(test)
        tsne_scatter(ax, x, y, names, seed, max_points, point_size=5)
        ax.set_title(_title(cfg, epoch), fontsize=9)
    if len(names) <= 20:
        axes[0][-1].legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle(f"t-SNE of the test {layer} features")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--layer", default="backbone", choices=["backbone", "projection"])
    p.add_argument("--out", default="tsne_compare.png")
    p.add_argument("--data", default=None, help="dataset root (default: each run's --data)")
    args = p.parse_args(argv)
    try:
        path = compare(args.runs, args.layer, args.out, args.data)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"side-by-side t-SNE: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
