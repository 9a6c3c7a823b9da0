"""InfoNCE / NT-Xent (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", SimCLR) and the logits builder it shares with FlatNCE.

Every anchor has ``n_views - 1`` positives (the other views of its image) and, as negatives, every
view of every other image in the *global* batch: with two views and a global batch of N images that
is one positive and 2N - 2 negatives per anchor. Keys may come from other ranks: pass the keys
gathered with :func:`common.distributed.gather_with_grad` and this rank's offset into them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ContrastiveLogits:
    """Similarities split into positives and negatives, already divided by the temperature."""

    pos: torch.Tensor  # (V*N, V-1): one column per positive of each anchor
    neg: torch.Tensor  # (V*N, K): K = V*N_global - V negatives per anchor
    temperature: float

    def infonce_per_pair(self) -> torch.Tensor:
        """-log softmax of each positive against itself and all negatives, shape (V*N, V-1)."""
        neg_lse = torch.logsumexp(self.neg, dim=1, keepdim=True)  # (V*N, 1)
        # log(exp(pos) + sum exp(neg)) computed stably for every positive column at once.
        return torch.logaddexp(self.pos, neg_lse) - self.pos

    @torch.no_grad()
    def similarity_stats(self) -> dict[str, torch.Tensor]:
        """Mean cosine similarity of positive and negative pairs (detached, for logging)."""
        return {
            "pos_sim": self.pos.float().mean() * self.temperature,
            "neg_sim": self.neg.float().mean() * self.temperature,
        }


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 to float32; leave float32 and float64 alone."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@functools.lru_cache(maxsize=32)
def _pair_columns(n_local: int, n_views: int, n_keys: int, offset: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key columns of each query's positives (V*N, V-1) and negatives (V*N, n_keys - V).

    Queries are this rank's views laid out view-major, ``[view0 of img 0..N-1, view1 of ...]``; keys are
    every rank's queries concatenated in rank order, this rank's starting at ``offset``. The columns
    depend only on these shapes, so they are built once (on the CPU) and reused: selecting with a
    boolean mask every step would make the GPU report the result's size to the host each time.
    """
    rows = torch.arange(n_views * n_local)
    same = offset + (rows % n_local)[:, None] + n_local * torch.arange(n_views)[None, :]  # (V*N, V), incl. self
    pos = same[same != (offset + rows)[:, None]].view(len(rows), n_views - 1)
    is_same = torch.zeros(len(rows), n_keys, dtype=torch.bool).scatter_(1, same, True)
    neg = torch.arange(n_keys).expand(len(rows), n_keys)[~is_same].view(len(rows), n_keys - n_views)
    return pos.to(device), neg.to(device)


def contrastive_logits(
    z: torch.Tensor,
    n_views: int,
    temperature: float,
    keys: torch.Tensor | None = None,
    offset: int = 0,
    cosine: bool = True,
) -> ContrastiveLogits:
    """Cosine-similarity logits of every local view against every (possibly gathered) view.

    Args:
        z: projections of this rank, shape (V*N, D), view-major (all first views, then all second).
        n_views: V, the number of views per image.
        temperature: softmax temperature t; logits are cos/t.
        keys: projections of all ranks concatenated, (W*V*N, D); defaults to ``z`` (one process).
        offset: index of this rank's first row inside ``keys``.
        cosine: L2-normalise first (cosine similarity, SimCLR); False: the raw dot product (sthalles/SimCLR's
            ``use_cosine_similarity: False``).
    """
    if z.shape[0] % n_views:
        raise ValueError(f"{z.shape[0]} embeddings cannot be split into {n_views} views")
    n_local = z.shape[0] // n_views
    # Similarities in fp32 even under autocast: a bf16 logsumexp over thousands of negatives is
    # visibly off, and this matmul is tiny next to the backbone.
    with torch.autocast(device_type=z.device.type, enabled=False):
        unit = (lambda x: F.normalize(x, dim=1)) if cosine else (lambda x: x)
        q = unit(at_least_fp32(z))
        k = q if keys is None else unit(at_least_fp32(keys))
        sim = q @ k.T / temperature  # (V*N, W*V*N)
    pos_cols, neg_cols = _pair_columns(n_local, n_views, k.shape[0], offset, z.device)
    pos = sim.gather(1, pos_cols)  # (V*N, V-1)
    neg = sim.gather(1, neg_cols)  # (V*N, W*V*N - V)
    return ContrastiveLogits(pos=pos, neg=neg, temperature=temperature)


def infonce_loss(logits: ContrastiveLogits) -> torch.Tensor:
    """NT-Xent: mean over anchors and positives of -log(e^pos / (e^pos + sum_neg e^neg))."""
    return logits.infonce_per_pair().mean()
