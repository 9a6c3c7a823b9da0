"""``--online_probe``: a linear classifier trained during pretraining on the detached backbone features of each
step's first view, with its own SGD, as solo-learn's and lightly's online classifiers. It never changes the
backbone (its input is detached), so a run with the probe learns the same weights as one without.

Its training loss and accuracy (on the augmented first views) are logged with the step's other values
(``probe_loss``, ``probe_acc``); at the end of each epoch it classifies the test split's centre views
(``monitor/probe_top1``), the number that tracks what a linear evaluation would say, at the cost of one pass
over the test set. Images without a label (STL-10's unlabeled part, label -1) are left out of its loss.
Its weights and optimizer state are in every checkpoint, so a resume continues it exactly. Under torchrun every
rank takes the same step (the gradient of the mean over all ranks' labelled images); its BatchNorm statistics are
each rank's own, and rank 0's are the ones saved.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.distributed import all_reduce_sum
from data.datasets import Split, dataset_labels


class OnlineProbe:
    """The classifier, its optimizer, and the labels of the pretraining images (on the device, by index)."""

    MOMENTUM = 0.9

    def __init__(self, train: Split, test: Split | None, feat_dim: int, lr: float, device: torch.device,
                 seed: int = 0) -> None:
        self.labels = dataset_labels(train.dataset).to(device)
        self.test = test  # scored on it (the caller may also hand its features over: :meth:`score`)
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
        with torch.autocast(features.device.type, enabled=False):
            logits = self.head(features.detach().float())
            total = (F.cross_entropy(logits, y.clamp(min=0), reduction="none") * known).sum()
        for group in self.optimizer.param_groups:
            group["lr"] = self.peak_lr * lr_fraction
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        # the mean over every rank's labelled images, as one process would take it: the summed gradients and
        # counts of all ranks in one all-reduce (ranks may hold different numbers of labelled images)
        params = list(self.head.parameters())
        local = known.sum()
        flat = torch.cat([p.grad.reshape(-1) for p in params] + [local.reshape(1).to(params[0].dtype)])
        flat = all_reduce_sum(flat)
        count = flat[-1].clamp(min=1)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p) / count)
            offset += p.numel()
        self.optimizer.step()
        local = local.clamp(min=1)
        loss = total.detach() / local
        correct = ((logits.detach().argmax(1) == y) & known).sum()
        return {"probe_loss": loss, "probe_acc": 100.0 * correct / local}

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
