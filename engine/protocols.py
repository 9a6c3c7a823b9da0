"""The evaluation protocols, one function each (``PROTOCOLS`` maps ``--transfer_mode`` to it): what every
protocol gets (:class:`EvalJob`), kNN, linear evaluation, fine-tuning, logistic regression, and the PCA baseline.
A new protocol is one function and one entry."""
from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from common.distributed import DistInfo
from common.errors import UserError
from data.datasets import Split
from engine import checkpoint as ckpt_io
from engine.knn import FeatureShard, extract_features, extract_shard, knn_scores_sharded
from engine.fitting import FitRun, fit_linear_on_features, fit_network
from engine.records import partial_path
from models.backbones import build_backbone
from models.checkpoint_file import backbone_weights


def load_backbone(path: str | None, arch: str, cifar_stem: bool, width: float = 1.0) -> tuple[nn.Module, int]:
    """The pretrained backbone of a checkpoint (or a random one of ``width`` for ``path=None``); the stem is
    read from the weights, the width from the checkpoint's record (1.0 before there was one)."""
    if path is None:
        return build_backbone(arch, cifar_stem, width)
    state = ckpt_io.load_checkpoint(path)
    weights = backbone_weights(state["model"])
    if not weights:
        raise UserError(f"{path} holds no backbone weights; it was not written by this tool's pretraining")
    trained_arch = state.get("arch", arch)
    if trained_arch != arch:
        raise UserError(f"{path} holds a {trained_arch} backbone, not {arch}; drop --arch (or pass "
                        f"--arch {trained_arch})")
    stem = weights["conv1.weight"].shape[-1] == 3
    backbone, dim = build_backbone(arch, stem, state.get("width_multiplier", 1.0))
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"{path} does not fit a {arch} backbone ({str(err).splitlines()[0]}); "
                        "pass the --arch it was pretrained with") from err
    return backbone, dim


@dataclass
class EvalJob:
    """What every protocol gets: the settings, the splits, and the labelled training subset (None: all)."""

    cfg: Namespace
    dist: DistInfo
    device: torch.device
    train: Split
    test: Split
    train_indices: list[int] | None
    out_dir: str = ""
    random_init: bool = False
    requests: Callable[[int], tuple[bool, bool]] = lambda next_step: (False, False)
    resume: dict | None = None  # the saved position of an interrupted fit (--train_from latest)
    epoch: int = 0  # the checkpoint being evaluated

    def fit_run(self) -> FitRun:
        """Where the fit of this checkpoint saves its position, and the position it resumes from."""
        path = None if self.random_init else partial_path(self.out_dir, self.cfg, self.epoch)
        return FitRun(path, self.requests, self.resume)

    @property
    def batch(self) -> int:  # feature extraction batch
        return min(self.cfg.fc_batch_size, 512)

    def train_shard(self, backbone: nn.Module) -> FeatureShard:
        """This rank's rows of the training features (all of them in one process), of the label subset if any."""
        shard = extract_shard(backbone, self.train, self.device, self.batch, self.cfg.workers, "train features",
                              self.dist.is_main)
        return shard if self.train_indices is None else shard.select(self.train_indices)

    def train_features(self, backbone: nn.Module, desc: str = "train features") -> tuple[torch.Tensor, torch.Tensor]:
        """The whole training features on every rank, for a protocol that cannot take shards."""
        x, y = extract_features(backbone, self.train, self.device, self.batch, self.cfg.workers, desc,
                                self.dist.is_main)
        if self.train_indices is None:
            return x, y
        sel = torch.tensor(self.train_indices, device=x.device)
        return x[sel], y[sel]

    def fc_settings(self) -> dict:
        cfg = self.cfg
        return dict(fc_epochs=cfg.fc_epochs, fc_lr=cfg.fc_lr, fc_batch_size=cfg.fc_batch_size,
                    fc_optimizer=cfg.fc_optimizer, fc_weight_decay=cfg.fc_weight_decay)


# A protocol: (job, backbone, feature dim, test features) -> (test scores, record fields, test features to plot).
Protocol = Callable[[EvalJob, nn.Module, int, torch.Tensor], tuple[torch.Tensor, dict, torch.Tensor]]


def knn_protocol(job: EvalJob, backbone: nn.Module, dim: int, test_x: torch.Tensor):
    shard = job.train_shard(backbone)  # test_x: the whole test set on every rank, the train set sharded
    scores = knn_scores_sharded(shard.feats, shard.labels, test_x, job.train.num_classes, job.cfg.knn_k,
                                job.cfg.knn_temperature)
    return scores, dict(k=job.cfg.knn_k, temperature=job.cfg.knn_temperature), test_x


def linear_protocol(job: EvalJob, backbone: nn.Module, dim: int, test_x: torch.Tensor):
    cfg = job.cfg
    if cfg.fc_augment:
        return _train_through(job, backbone, dim, test_x, finetune=False)
    shard = job.train_shard(backbone)
    head = fit_linear_on_features(shard.feats, shard.labels, job.train.num_classes, cfg.fc_epochs, cfg.fc_batch_size,
                                  cfg.fc_lr, cfg.fc_weight_decay, cfg.fc_momentum, cfg.fc_optimizer,
                                  cfg.fc_scheduler, cfg.seed, job.dist.is_main, rows=shard.rows)
    with torch.no_grad():
        scores = head(test_x)
    return scores, dict(path="cached features", **job.fc_settings()), test_x


def finetune_protocol(job: EvalJob, backbone: nn.Module, dim: int, test_x: torch.Tensor):
    return _train_through(job, backbone, dim, test_x, finetune=True)


def _train_through(job: EvalJob, backbone: nn.Module, dim: int, test_x: torch.Tensor, finetune: bool):
    """Train on augmented images through the backbone (frozen or not); fine-tuning plots its own features."""
    model, fit_fields = fit_network(backbone, dim, job.train, job.train_indices, job.cfg, job.dist, job.device,
                                    finetune, job.fit_run())
    scores, _ = extract_features(model, job.test, job.device, job.batch, job.cfg.workers, "test logits",
                                 job.dist.is_main)
    if finetune:
        test_x, _ = extract_features(model[0], job.test, job.device, job.batch, job.cfg.workers, show=False)
    return scores, dict(path="augmented", **fit_fields, **job.fc_settings()), test_x


def logistic_protocol(job: EvalJob, backbone: nn.Module, dim: int, test_x: torch.Tensor):
    """sthalles/SimCLR's "Logistic Regression (LBFGS)" rows: scikit-learn's L-BFGS logistic regression (C = 1,
    up to --logistic_max_iter iterations) on frozen features standardised with the training set's mean and std."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_x, train_y = job.train_features(backbone)  # scikit-learn fits in one process: the whole set on every rank
    scaler = StandardScaler().fit(train_x.double().cpu().numpy())
    clf = LogisticRegression(solver="lbfgs", C=1.0, max_iter=job.cfg.logistic_max_iter, random_state=job.cfg.seed)
    clf.fit(scaler.transform(train_x.double().cpu().numpy()), train_y.cpu().numpy())
    log_p = torch.from_numpy(clf.predict_log_proba(scaler.transform(test_x.double().cpu().numpy())))
    scores = torch.full((test_x.shape[0], job.train.num_classes), float("-inf"), dtype=torch.float64)
    scores[:, torch.from_numpy(clf.classes_).long()] = log_p  # classes missing from a label subset never win
    return scores.to(test_x.device), dict(C=1.0, max_iter=job.cfg.logistic_max_iter, n_iter=int(clf.n_iter_.max())), \
        test_x


class PCAFeatures(nn.Module):
    """Raw (normalised) pixels projected on their first principal components: the no-learning baseline."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("components", components)  # (D, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) - self.mean) @ self.components


def fit_pca(job: EvalJob, k: int) -> tuple[nn.Module, int]:
    """PCA of the training images' pixels (as the evaluation transform gives them) to ``k`` dimensions."""
    pixels, _ = job.train_features(nn.Flatten(), "pixels")
    k = min(k, pixels.shape[0], pixels.shape[1])
    mean = pixels.mean(dim=0)
    _, _, v = torch.pca_lowrank(pixels - mean, q=k, center=False, niter=4)
    return PCAFeatures(mean, v[:, :k]).to(job.device), k


PROTOCOLS: dict[str, Protocol] = {"linear_eval": linear_protocol, "finetune": finetune_protocol, "knn": knn_protocol,
                                  "logistic": logistic_protocol}

