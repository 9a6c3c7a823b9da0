"""What a method is: an ``nn.Module`` that owns its networks and its loss (the MoCo-v3 pattern), and a
:class:`MethodSpec` that tells the rest of the tool everything else about it (name, settings, views, checks).

``forward(views, index) -> (loss, logs, outputs)`` and ``after_step(step, total_steps, outputs)`` are all the
training loop calls, so DDP wraps one module and nothing outside ``models/methods/`` branches on ``--clr``. A method writes
its loss in ``objective``; ``forward`` adds what every method may add (the auxiliary rotation prediction).
"""
from __future__ import annotations

import math
from argparse import Namespace
from collections import OrderedDict
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.settings import typed
from data.augment import ViewSpec, symmetric_views
from data.rotation import random_rotations, rotate
from losses.diagnostics import embedding_stats

Logs = dict[str, torch.Tensor]
# The shared settings a method may give its own default (MethodSpec.defaults).
METHOD_DEFAULTABLE = ("optimizer", "lr", "weight_decay", "temperature", "proj_hidden_dim", "proj_out_dim",
                      "num_proj_layers")
LOSS_TITLES = {"infonce": "InfoNCE", "flatnce": "FlatNCE"}  # --loss values as run names spell them
Outputs = dict[str, torch.Tensor]  # what a step hands to after_step (detached, batch first)


class SSLMethod(nn.Module):
    """Backbone + projector; subclasses define the objective.

    ``LEGACY_KEYS`` renames state-dict keys of checkpoints written by older versions of a method
    (old key or old prefix ending in '.' -> today's), so those checkpoints keep resuming.
    """

    LEGACY_KEYS: dict[str, str] = {}
    # Buffers that are NaN by design until the method sets them: the check for poisoned weights before a save
    # skips them.
    MAY_BE_UNSET: tuple[str, ...] = ()

    def __init__(self, backbone: nn.Module, projector: nn.Module, n_views: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.n_views = n_views
        self.diagnose = False  # set by the training loop on logging steps: add losses/diagnostics.py's figures
        # Set by the training loop before each forward: the step's generator (data/rotation.py) and the
        # fraction of the run done before this step.
        self.step_generator: torch.Generator | None = None
        self.register_buffer("progress", torch.zeros(()), persistent=False)
        self.rot_head: nn.Module | None = None
        # --online_probe: forward's outputs carry the first view's backbone features (detached), which embed keeps
        self.keep_features = False
        self._kept: torch.Tensor | None = None
        self.rot_pred = (0.0, False, 1.0)  # weight, cosine decay, temperature

    def add_rotation_prediction(self, dim: int, weight: float, decay: bool, temperature: float) -> None:
        """MetaContrastive's auxiliary task: a linear 4-way head on the projections (L2-normalised, divided by
        sqrt(temperature), as the authors' models/encoder.py) predicts each view's rotation from a second forward
        of the views, each turned by its own random k*90 degrees; ``weight`` * cross-entropy is added to the loss,
        decayed along a cosine to 0 over the run when ``decay`` (the authors' --adpt)."""
        self.rot_head = nn.Linear(dim, 4)
        self.rot_pred = (weight, decay, temperature)

    def objective(self, views: list[torch.Tensor], index: torch.Tensor):
        """The method's loss and logs for a batch of views: ``(loss, logs)``, or ``(loss, logs, outputs)`` where
        ``outputs`` (detached tensors, batch first) are what :meth:`after_step` needs of the step (the keys a
        queue or a bank takes in): the loop concatenates them over the step's micro-batches."""
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, Logs, Outputs]:
        """``(loss, logs, outputs)`` of :meth:`objective`, plus the rotation prediction when it is on."""
        self._kept = None
        loss, logs, *rest = self.objective(views, index)
        outputs = rest[0] if rest else {}
        if self.keep_features:
            if self._kept is None:
                raise RuntimeError(f"{type(self).__name__}.objective does not compute its projections through "
                                   "embed(), so --online_probe has no backbone features to train on")
            outputs = {**outputs, "backbone_features": self._kept}
        if self.rot_head is None:
            return loss, logs, outputs
        weight, decay, temperature = self.rot_pred
        x = torch.cat(views)
        k = random_rotations(x.shape[0], self.step_generator, x.device)
        z = self.projector(self.backbone(rotate(x, k)))
        logits = self.rot_head(F.normalize(z.float(), dim=1) / temperature ** 0.5).float()
        rot = F.cross_entropy(logits, k)
        if decay:  # progress is a tensor the loop fills: the same graph every step under --compile
            scale = weight * (torch.cos(math.pi * self.progress) + 1) / 2
        else:
            scale = torch.full_like(self.progress, weight)
        logs = {**logs, "rot_pred_loss": rot.detach(), "rot_pred_acc": (logits.argmax(1) == k).float().mean().detach(),
                "rot_pred_weight": scale.detach()}
        return loss + scale * rot, logs, outputs

    def diagnostics(self, z: torch.Tensor) -> Logs:
        """The embedding diagnostics of projections ``z`` on a logging step, else nothing."""
        return embedding_stats(z, self.n_views) if self.diagnose else {}

    def embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Projections of all views, view-major: (V*N, D). With ``keep_features`` (the online probe), the first
        view's backbone features are kept, detached, for :meth:`forward`'s outputs."""
        h = self.backbone(torch.cat(views))
        if self.keep_features and self._kept is None:
            self._kept = h[: views[0].shape[0]].detach()
        return self.projector(h)

    def after_step(self, step: torch.Tensor, total_steps: int, outputs: Outputs) -> None:
        """Called once after each optimizer step; ``step`` counts completed steps (1-based; a long tensor on the
        device, counted in place, so that a captured step replays it), ``outputs`` are the
        step's outputs of :meth:`objective` (over all its micro-batches). Update state in place (buffers), read
        nothing back to the host: the step stays one stream of device work."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.LEGACY_KEYS:
            state_dict = _renamed(state_dict, self.LEGACY_KEYS)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _renamed(state_dict, renames: dict[str, str]) -> OrderedDict:
    """``state_dict`` with old keys (or old prefixes ending in '.') renamed, its ``_metadata`` too."""

    def rename(key: str) -> str:
        for old, new in renames.items():
            if key == old or (old.endswith(".") and key.startswith(old)):
                return new + key[len(old):]
        return key

    out = OrderedDict((rename(k), v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # keyed by module prefix without the trailing '.'
        out._metadata = OrderedDict((rename(k + ".")[:-1] if k else k, v) for k, v in metadata.items())
    return out


def no_checks(cfg: Namespace) -> None:
    """A method without settings of its own to check."""


def two_views_by_default(cfg: Namespace) -> None:
    """--n_views when not given: 2."""
    if cfg.n_views is None:
        cfg.n_views = 2


@dataclass(frozen=True)
class MethodSpec:
    """Everything the tool needs to know about a method, registered once in ``models.methods.METHODS``.

    * ``display``: the name in run directories, ``results/<dataset>/<bs>_<display>/<date>``.
    * ``build(cfg, backbone, projector, dim, num_data)``: the method module; ``dim`` is the projector's
      output width, ``num_data`` the number of training images (InsDis sizes its memory bank with it).
    * ``settings``: its own settings, a frozen dataclass of :func:`common.settings.setting` fields (default,
      help, choices, range, ``identity=True`` for one that defines a run, ``exclusive=True`` for one refused on
      another method's command line): its group in ``--help``, its flags, range checks and resume identity are
      generated from it, and :meth:`own` gives the typed values of a run.
    * ``min_views``: the fewest augmented views per image it can train on.
    * ``views(n_views, blur)``: the view recipe (blur/solarize probabilities of each view).
    * ``settle(cfg)``: fills settings that follow from others (e.g. --n_views from --n_supp + --n_query),
      before ``validate``.
    * ``validate(cfg)``: raises ``UserError`` for settings it cannot train with.
    * ``tiny``: its own flags at a small size (``{"insdis_num_negatives": 64}``): what the tests and the quickest
      checks run it with.
    * ``losses``: for a method with an InfoNCE-shaped objective, ``--loss`` name -> the registered method that
      trains with that loss (SimCLR's ``{"infonce": "simclr", "flatnce": "flatclr"}``; a method that takes either
      itself maps both to its own name and reads ``--loss``); empty: ``--loss`` is refused. ``loss``: its own
      (default) loss; a run with another is named ``<display>-<Loss>`` (``MoCoV2-FlatNCE``).
    * ``defaults``: its own defaults for shared settings (:data:`METHOD_DEFAULTABLE`: the optimizer, lr, weight
      decay, temperature, projector sizes), e.g. ``{"temperature": 0.2}``. Precedence: the command line, then
      ``--config``, then these, then the tool's defaults; ``config.yaml`` records where each value came from.
    """

    display: str
    build: Callable[..., SSLMethod]
    summary: str = ""
    settings: type | None = None
    min_views: int = 2
    views: Callable[[int, bool], list[ViewSpec]] = symmetric_views
    settle: Callable[[Namespace], None] = two_views_by_default
    validate: Callable[[Namespace], None] = no_checks
    losses: dict[str, str] = field(default_factory=dict)
    loss: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    tiny: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in self.fields():
            if f.metadata["per_invocation"] or f.metadata["machine"]:
                raise ValueError(f"--{f.name}: a method's setting belongs to its runs; per_invocation and machine "
                                 "are for core settings (engine/settings.py)")
        unknown = set(self.defaults) - set(METHOD_DEFAULTABLE)
        if unknown:
            raise ValueError(f"a method may give its own default to {', '.join(METHOD_DEFAULTABLE)}, not to "
                             f"{', '.join(sorted(unknown))}")

    def fields(self) -> tuple[dataclasses.Field, ...]:
        """Its own settings' declarations (none for a method without settings)."""
        return dataclasses.fields(self.settings) if self.settings is not None else ()

    @property
    def identity(self) -> tuple[str, ...]:
        """Its settings that define a run: a resume that changes one is refused."""
        return tuple(f.name for f in self.fields() if f.metadata["identity"])

    def display_for(self, cfg: Namespace) -> str:
        """The name of a run in its directory and its first line: ``display``, with the loss when the run trains
        with another than the method's own (``MoCoV2-FlatNCE``)."""
        loss, trainer = cfg.loss, self.losses.get(self.loss)
        if loss in LOSS_TITLES and loss != self.loss and trainer is not None and self.losses.get(loss) == trainer:
            return f"{self.display}-{LOSS_TITLES[loss]}"
        return self.display

    def own(self, cfg: Namespace) -> Any:
        """The typed values of its own settings in resolved settings ``cfg``."""
        return typed(self.settings, cfg) if self.settings is not None else None
