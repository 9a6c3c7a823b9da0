"""torch.hub entry points of this repository (a local clone):

    import torch
    backbone = torch.hub.load("/path/to/clone", "backbone", source="local", path="RUN_DIR or checkpoint or export")

``backbone`` returns the pretrained ResNet (``fc = nn.Identity()``, eval mode); ``backbone_and_meta`` also
returns what it was trained with (architecture, stem, width, feature dim, normalisation, image size).
"""
dependencies = ["torch", "torchvision"]

from models.pretrained import load_pretrained  # noqa: E402


def backbone(path: str, map_location: str = "cpu"):
    """The pretrained backbone at ``path`` (a run directory, a checkpoint_*.pth.tar or an export .pth)."""
    return load_pretrained(path, map_location)[0]


def backbone_and_meta(path: str, map_location: str = "cpu"):
    """(backbone, metadata) at ``path``; see models/pretrained.py."""
    return load_pretrained(path, map_location)
