"""Loss functions. ``LOSSES`` maps the contrastive loss name to its reduction of the shared logits."""
from losses.byol import byol_loss
from losses.flatnce import flatnce_loss
from losses.infonce import ContrastiveLogits, contrastive_logits, infonce_loss
from losses.insdis import insdis_nce_loss, insdis_softmax_loss

LOSSES = {"infonce": infonce_loss, "flatnce": flatnce_loss}

__all__ = [
    "LOSSES",
    "ContrastiveLogits",
    "byol_loss",
    "contrastive_logits",
    "flatnce_loss",
    "infonce_loss",
    "insdis_nce_loss",
    "insdis_softmax_loss",
]
