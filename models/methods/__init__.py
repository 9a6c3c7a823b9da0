"""The method registry: ``--clr`` name -> :class:`MethodSpec`. Everything that needs to know which
methods exist (the CLI's choices, flags and checks, run directories, resume, views, tests, benchmarks)
reads this one dict. Adding a method: a file in this folder with its module and spec, its import and its
entry here.
"""
from models.methods import byol, contrastive, insdis
from models.methods.base import Logs, MethodSpec, SSLMethod, no_checks
from models.methods.byol import BYOL
from models.methods.contrastive import ContrastiveMethod
from models.methods.insdis import InsDis

METHODS: dict[str, MethodSpec] = {
    "simclr": contrastive.SIMCLR,
    "flatclr": contrastive.FLATCLR,
    "byol": byol.SPEC,
    "insdis": insdis.SPEC,
}

__all__ = ["BYOL", "METHODS", "ContrastiveMethod", "InsDis", "Logs", "MethodSpec", "SSLMethod",
           "no_checks"]
