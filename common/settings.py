"""Resolved settings: what the engine and the methods receive, read-only.

The command line, ``--config``, a method's own defaults and a resumed run's values are merged and checked once
(:func:`cli.resolve.resolve`); the result is a :class:`Settings`, whose attributes cannot be set afterwards. A
value the engine derives (the epochs of an ``--iters`` run once the data is known, the evaluation's classifier lr)
makes a new object with :func:`derive`, which the engine passes on; the caller's settings never change under it.
"""
from __future__ import annotations

from argparse import Namespace


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
