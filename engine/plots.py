"""The pictures of an evaluation: t-SNE of the test features, accuracy against the pretraining epoch."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def plot_tsne(feats: torch.Tensor, labels: torch.Tensor, class_names: list[str], path: str, title: str,
              seed: int, max_points: int = 2000) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    tsne_scatter(ax, feats, labels, class_names, seed, max_points, point_size=6)
    if len(class_names) <= 20:
        ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tsne_scatter(ax, feats: torch.Tensor, labels: torch.Tensor, class_names: list[str], seed: int, max_points: int,
                 point_size: float) -> None:
    """A t-SNE of (at most ``max_points`` of) the L2-normalised ``feats`` on the matplotlib axes ``ax``, one
    colour per class; also used by experiments/tsne_compare.py for runs side by side."""
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    keep = np.random.default_rng(seed).permutation(feats.shape[0])[:max_points]
    x = F.normalize(feats[keep].float(), dim=1).cpu().numpy()
    y = labels[keep].cpu().numpy()
    if len(x) < 3:  # no neighbourhood to keep: the points as they are, on their first two coordinates
        xy = np.pad(x, ((0, 0), (0, max(0, 2 - x.shape[1]))))[:, :2]
    else:  # perplexity must stay below the number of points (a test split of a handful of images)
        xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, max(5.0, len(x) / 10), len(x) - 1.0),
                  random_state=seed).fit_transform(x)
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for c in sorted(set(y.tolist())):
        m = y == c
        ax.scatter(xy[m, 0], xy[m, 1], s=point_size, color=cmap(c % cmap.N),
                   label=class_names[c] if c < len(class_names) else str(c))
    ax.set_xticks([])
    ax.set_yticks([])


def plot_accuracy_vs_epoch(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["checkpoint_epoch"] for r in results]
    ax.plot(epochs, [r["top1"] for r in results], marker="o", label="top-1")
    ax.plot(epochs, [r["top5"] for r in results], marker="s", label="top-5")
    ax.set_xlabel("pretraining epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

