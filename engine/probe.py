"""``--online_probe``: a linear classifier trained during pretraining on the detached backbone features of each
step's first view, with its own SGD, as solo-learn's and lightly's online classifiers. It never changes the
backbone (its input is detached), so a run with the probe learns the same weights as one without.

Its training loss and accuracy (on the augmented first views) are logged with the step's other values
(``probe_loss``, ``probe_acc``); at the end of each epoch it classifies the test split's centre views
(``monitor/probe_top1``), the number that tracks what a linear evaluation would say, at the cost of one pass
over the test set. Images without a label (STL-10's unlabeled part, label -1) are left out of its loss.
Its weights and optimizer state are in every checkpoint, so a resume continues it exactly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.distributed import all_reduce_sum, get_world_size
from data.datasets import Split, dataset_labels


class OnlineProbe:
    """The classifier, its optimizer, and the labels of the pretraining images (on the device, by index)."""

    MOMENTUM = 0.9

    def __init__(self, train: Split, feat_dim: int, lr: float, device: torch.device, seed: int = 0) -> None:
        self.labels = dataset_labels(train.dataset).to(device)
        # features standardised by a BatchNorm without affine weights before the linear layer (as MAE's linear
        # probe): the backbone's feature scale drifts during pretraining, and one lr then serves every run
        with torch.random.fork_rng(devices=[]):  # its own draw: the run's random stream is the same without it
            torch.manual_seed(seed)
            self.head = nn.Sequential(nn.BatchNorm1d(feat_dim, affine=False), nn.Linear(feat_dim, train.num_classes))
        self.head.to(device)
        self.peak_lr = lr
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=self.MOMENTUM)

    def step(self, features: torch.Tensor, index: torch.Tensor, lr_fraction: float) -> dict[str, torch.Tensor]:
        """One SGD step on a batch of detached features of images ``index``; ``lr_fraction``: where the
        pretraining schedule is, relative to its peak (the probe follows its shape). Returns device scalars."""
        y = self.labels[index]
        known = y >= 0
        count = known.sum()
        with torch.autocast(features.device.type, enabled=False):
            logits = self.head(features.detach().float())
            per_image = F.cross_entropy(logits, y.clamp(min=0), reduction="none") * known
            loss = per_image.sum() / count.clamp(min=1)
        for group in self.optimizer.param_groups:
            group["lr"] = self.peak_lr * lr_fraction
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        world = get_world_size()
        if world > 1:  # every rank's probe takes the same step: the gradient averaged over ranks
            for p in self.head.parameters():
                all_reduce_sum(p.grad).div_(world)
        self.optimizer.step()
        correct = ((logits.detach().argmax(1) == y) & known).sum()
        return {"probe_loss": loss.detach(), "probe_acc": 100.0 * correct / count.clamp(min=1)}

    @torch.no_grad()
    def score(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 (%) on the test split's features."""
        self.head.eval()
        predicted = self.head(features.float()).argmax(1)
        self.head.train()
        return 100.0 * float((predicted == labels).float().mean())

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
