"""Declared and resolved settings.

A setting is declared once, as a field of a frozen dataclass made with :func:`setting`: the core ones in
:mod:`engine.settings` (one dataclass per concern), a method's own on its ``MethodSpec.settings``. The parser, the
range checks and the keys a resume must keep are generated from those declarations.

Resolved settings: what the engine and the methods receive, read-only.

The command line, ``--config``, a method's own defaults and a resumed run's values are merged and checked once
(:func:`cli.resolve.resolve`); the result is a :class:`Settings`, whose attributes cannot be set afterwards. A
value the engine derives (the epochs of an ``--iters`` run once the data is known, the evaluation's classifier lr)
makes a new object with :func:`derive`, which the engine passes on; the caller's settings never change under it.
"""
from __future__ import annotations

import dataclasses
from argparse import Namespace
from typing import Any, NamedTuple

BOOL = "bool"  # flag=BOOL: --x, --x=True/False/1/0 and --no-x


class Bounds(NamedTuple):
    """A number's range: ``low`` <= value (< with ``open_below``), value <= ``high`` (< with ``open_above``)."""

    low: float
    high: float | None
    what: str  # "must <what>" in the error line
    open_below: bool = False
    open_above: bool = False


def setting(default: Any, help: str | None = None, *, flag: str | None = None, parse: Any = None,
            choices: list | str | None = None, metavar: str | None = None, at_least: int | None = None,
            bounds: Bounds | None = None, identity: bool = False, per_invocation: bool = False,
            machine: bool = False, help_of: str | None = None, exclusive: bool = False):
    """A declared setting. ``parse``: how the command line reads it (default: the field's type; "protocols": a
    comma-separated list of evaluation protocols); ``choices`` or
    ``help_of``: a list, or the name of a registry (``cli.parser.REGISTRIES``) read when the parser is built;
    ``at_least``: 0 ("not be negative") or 1 ("be at least 1"), or ``bounds`` for another range. ``identity``: a
    resume must not change it (it defines the run). ``machine``: a setting of the machine an invocation runs on,
    not of the run: never saved in config.yaml nor restored on a resume (a config file or a sweep cell may still
    set it). ``exclusive`` (a method's setting): given on the command line of a method that does not declare it,
    it is refused (it would do nothing there); otherwise it is ignored, so that one setting can serve several
    methods."""
    if at_least is not None:
        bounds = Bounds(at_least, None, "be at least 1" if at_least == 1 else "not be negative")
    meta = {"default": default, "help": help, "flag": flag, "parse": parse, "choices": choices, "metavar": metavar,
            "bounds": bounds, "identity": identity, "per_invocation": per_invocation, "machine": machine,
            "help_of": help_of, "exclusive": exclusive}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def typed(cls: type, cfg) -> Any:
    """The typed ``cls`` view (a concern such as ``engine.settings.Data``, or a method's settings) of resolved
    settings ``cfg``."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


class FrozenSettings(AttributeError):
    """A setting assigned after resolution: a bug in the code that did it, not a user's mistake."""


class Settings(Namespace):
    """Read-only resolved settings (a ``Namespace``: ``vars()`` and attribute reads work as for the parser's)."""

    def __init__(self, values: dict) -> None:
        self.__dict__.update(values)

    def __setattr__(self, name: str, value) -> None:
        raise FrozenSettings(f"settings are read-only once resolved: --{name} cannot be set; derive a new "
                             "object with common.settings.derive")

    def __delattr__(self, name: str) -> None:
        raise FrozenSettings(f"settings are read-only once resolved: --{name} cannot be removed")


def derive(cfg: Namespace, **changes) -> Namespace:
    """A copy of ``cfg`` with ``changes``, of the same kind (read-only settings stay read-only)."""
    values = {**vars(cfg), **changes}
    return Settings(values) if isinstance(cfg, Settings) else Namespace(**values)


def frozen(cfg: Namespace) -> Settings:
    """``cfg`` as read-only settings."""
    return cfg if isinstance(cfg, Settings) else Settings(vars(cfg))
