"""The command line's building blocks: booleans as FlatCLR's commands write them (``--x``, ``--no-x``,
``--x=True/False/1/0``), finite numbers, comma-separated protocol lists, and a parser whose errors are one line
naming the setting by its own flag."""
from __future__ import annotations

import argparse
import math
import re

from common.errors import UserError
from engine.protocols import PROTOCOLS

TRUE, FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def str2bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False, 1/0), got {value!r}")


def add_bool(group, name: str, default: bool | None, help: str) -> None:
    """``--name``, ``--name=True/False/1/0`` and ``--no-name``; ``None`` default means 'auto'."""
    group.add_argument(f"--{name}", dest=name, type=str2bool, nargs="?", const=True, default=default, help=help)
    group.add_argument(f"--no-{name}", dest=name, action="store_false", help=argparse.SUPPRESS)


def finite_float(value: str) -> float:
    """A number as the command line reads it, refusing nan and inf (they would train a step, then blame --lr)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line "error: ...", exit status 2, no usage dump (main reports it)
        m = re.match(r"argument (-[^\s:]+):", message)
        if m:  # one name per setting: its own flag, not the spelling (or every spelling) argparse lists
            action = self._option_string_actions.get(m.group(1).split("/")[0])
            if action is not None and action.dest != argparse.SUPPRESS:
                message = f"argument --{action.dest}:{message[m.end():]}"
        raise UserError(f"{message} (see --help)")


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def protocol_list(value: str) -> list[str]:
    names = split_list(value)
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown protocol {', '.join(unknown)}; choose from {', '.join(PROTOCOLS)}")
    return names


