"""The parser, generated from declarations: the core flags grouped by concern (mode, data, model, objective,
optimisation, evaluation, run) from :mod:`engine.settings`, one group per method from its declared settings
(``MethodSpec.settings``), and the other repositories' spellings from :mod:`cli.compat` (shown by
``--help-all``, not ``--help``)."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from cli.compat import add_compat_flags
from cli.options import Parser, add_bool, finite_float, protocol_list
from data.datasets import DATASETS
from engine.protocols import PROTOCOLS
from engine.settings import BOOL, CONCERNS
from models import ARCH_ALIASES, BACKBONES, METHODS


class HelpAll(argparse.Action):
    """``--help-all``: the help with the compatibility spellings, then exit 0."""

    def __call__(self, parser, namespace, values, option_string=None):
        build_parser(show_compat=True).print_help(sys.stdout)
        parser.exit()


def build_parser(show_compat: bool = False) -> argparse.ArgumentParser:
    """The core flags grouped by concern, each method's own group, then the other tools' spellings (listed by
    ``--help-all`` only; see :mod:`cli.compat`)."""
    p = Parser(prog="main.py", usage="%(prog)s [--config FILE] [--flag VALUE ...]   (--help-all: with other "
                                      "tools' spellings)",
               description="Contrastive self-supervised pretraining (FlatCLR family).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", default=None, help="yaml file of defaults (keys = flag names); flags win")

    for concern in CONCERNS[:4]:  # mode, data, model, objective
        add_concern(p, concern)
    add_method_flags(p)
    for concern in CONCERNS[4:]:  # optimisation, evaluation, run
        add_concern(p, concern)
    add_compat_flags(p, show_compat)
    p.add_argument("--help-all", action=HelpAll, nargs=0, default=argparse.SUPPRESS, help="this help with the other tools' spellings "
                                                              "(FlatCLR, UnsupervisedLearningCodes, MetaContrastive)")
    for action in p._actions:  # every number flag, the methods' and the other tools' too: finite
        if action.type is float:
            action.type = finite_float
    return p


def add_concern(p: argparse.ArgumentParser, concern: type) -> None:
    """One argument group from a concern's declared settings (:mod:`engine.settings`)."""
    add_fields(p.add_argument_group(concern.GROUP), dataclasses.fields(concern))


def add_fields(g, fields) -> None:
    """A flag for each declared setting (:func:`common.settings.setting`) in argument group ``g``."""
    for field in fields:
        meta = field.metadata
        written = type_name(field.type).split(" ")[0]
        if meta["flag"] == BOOL or written == "bool":
            add_bool(g, field.name, meta["default"], help_of(field))
            continue
        if not meta["parse"] and written not in TYPES:
            raise ValueError(f"--{field.name} is declared as {type_name(field.type)!r}; a setting is an int, float, str "
                             "or bool (optionally '| None'), or names a parse= rule")
        kind = PARSE.get(meta["parse"], meta["parse"]) or TYPES[written]
        extra = {"metavar": meta["metavar"]} if meta["metavar"] else {}
        default = list(meta["default"]) if isinstance(meta["default"], list) else meta["default"]  # a fresh list
        g.add_argument(f"--{field.name}", type=kind, default=default, choices=choices_of(field),
                       help=help_of(field), **extra)


def type_name(annotation) -> str:
    """A field's type as written ("int | None"), whether its module postpones annotations or not."""
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)


TYPES = {"int": int, "float": float, "str": str}
PARSE = {"protocols": protocol_list}
# The registries a declaration names for its choices or its help (read here, when the parser is built).
REGISTRIES = {"methods": lambda: list(METHODS), "archs": lambda: list(BACKBONES) + list(ARCH_ALIASES),
              "datasets": lambda: list(DATASETS), "protocols": lambda: list(PROTOCOLS)}
HELPS = {"methods": lambda: "method: " + "; ".join(f"{k} ({s.display}: {s.summary})" for k, s in METHODS.items()),
         "final_eval": lambda: "when pretraining reaches --epochs, evaluate the last checkpoint with these protocols "
                               f"(comma-separated: {','.join(PROTOCOLS)}) into RUN/eval/, as --train_mode eval would"}


def choices_of(field: dataclasses.Field) -> list | None:
    choices = field.metadata["choices"]
    return REGISTRIES[choices]() if isinstance(choices, str) else choices


def help_of(field: dataclasses.Field) -> str | None:
    named = field.metadata["help_of"]
    return HELPS[named]() if named else field.metadata["help"]


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    """One argument group per method, from its declared settings (settings two methods share are added once)."""
    seen: dict[str, dataclasses.Field] = {}
    for name, spec in METHODS.items():
        fresh = [f for f in spec.fields() if f.name not in seen]
        for field in spec.fields():
            if seen.setdefault(field.name, field).metadata != field.metadata:
                raise ValueError(f"methods declare --{field.name} twice with different declarations")
            if field in fresh and f"--{field.name}" in parser._option_string_actions:
                raise ValueError(f"method {name} declares --{field.name}, which is already a flag of the tool")
        if fresh:
            add_fields(parser.add_argument_group(f"{spec.display} (--clr {name})"), fresh)
