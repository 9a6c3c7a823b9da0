"""``--config file.yaml``: flat keys named as the flags, every value checked as the command line checks its flag
(type, choices, finite numbers; a list, a mapping or null where one value is meant is one line naming the file and
the key), set as the parser's defaults so that the command line wins. sthalles/SimCLR's nested config is
translated first (:func:`cli.compat.map_sthalles_config`)."""
from __future__ import annotations

import argparse
import math
import os

from cli.compat import STHALLES_SECTIONS, map_sthalles_config
from cli.options import finite_float, protocol_list, str2bool
from common.errors import UserError
from common.yamlfile import read_mapping


def read_yaml(path: str) -> dict:
    """A ``--config`` file's mapping; any problem is one line."""
    return read_mapping(path, f"config file {path}", of="of flag names to values")


def apply_yaml(parser: argparse.ArgumentParser, path: str) -> set[str]:
    """``--config``'s values as the parser's defaults, each checked as the command line checks its flag; returns
    the settings it gave."""
    if os.path.isdir(path):
        raise UserError(f"--config {path} is a directory; pass a yaml file, e.g. configs/quickstart.yaml")
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found; pass an existing yaml, e.g. configs/quickstart.yaml")
    values = read_yaml(path)
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:  # a boolean's first action is --x (its --no-x follows)
        if action.dest != "help":
            actions.setdefault(action.dest, action)
    for recorded in ("schedule", "input_stats", "provenance", "sources"):  # a run's config.yaml records: not flags
        if isinstance(values.get(recorded), dict):
            del values[recorded]
    if any(isinstance(values.get(k), dict) for k in STHALLES_SECTIONS) or "fine_tune_from" in values:
        values = map_sthalles_config(values, path)
    unknown = sorted(map(str, set(values) - set(actions)))
    if unknown:
        raise UserError(f"unknown key(s) in {path}: {', '.join(unknown)}; keys are flag names as in --help")
    if values.get("config") is not None:  # (null: a run's config.yaml of older versions records it so)
        raise UserError(f"{path}: a config file cannot name another (config: {values['config']}); merge the two "
                        "files, or pass the other one with --config")
    values.pop("config", None)
    parser.set_defaults(**{key: yaml_value(actions[key], key, value, path) for key, value in values.items()})
    return set(values)


def yaml_value(action: argparse.Action, key: str, value, path: str):
    """A yaml value for ``action``'s flag, checked as the command line checks ``--key=value``: the same type and
    choices, a boolean as true/false (or the strings the command line takes), no list where one value is
    meant, null only where the flag's default is unset. One line naming the file and key otherwise."""
    def bad(what: str) -> UserError:
        return UserError(f"{path}: {key}: {what}; fix the value (as --{key} takes it) or leave the key out")

    kind = action.type
    if value is not None and not isinstance(value, (bool, int, float, str, list, dict)):  # a date, !!binary...
        raise bad(f"is a yaml {type(value).__name__} ({value!r}), not a value --{key} takes; quote it if it is a "
                  "word")
    if value is None:
        if action.default is None:
            return None
        raise bad("is null but needs a value")
    if isinstance(value, list) and kind is protocol_list and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if isinstance(value, (list, dict)):
        raise bad(f"is a {'list' if isinstance(value, list) else 'mapping'} ({value!r}) but takes one value")
    if kind is str2bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) or value in (0, 1):
            try:
                return str2bool(str(value))
            except argparse.ArgumentTypeError as err:
                raise bad(str(err)) from None
        raise bad(f"expected true or false, got {value!r}")
    if isinstance(value, bool):
        raise bad(f"expected {'an integer' if kind is int else 'a number' if kind is finite_float else 'a word'}, "
                  f"got {value}")
    if kind is int:
        if isinstance(value, str):  # YAML 1.1 reads 1e3 (no dot) as a string: read it as the number it is
            try:
                value = float(value) if not value.strip().lstrip("+-").isdigit() else int(value)
            except ValueError:
                raise bad(f"expected an integer, got {value!r}") from None
        if isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()):
                raise bad(f"expected an integer, got {value!r}")
            value = int(value)
    elif kind is finite_float:
        try:
            value = finite_float(value if isinstance(value, str) else repr(float(value)))
        except (argparse.ArgumentTypeError, OverflowError) as err:
            raise bad(str(err) if isinstance(err, argparse.ArgumentTypeError) else "expected a finite number, got "
                      "an integer too large for one") from None
    else:
        value = str(value)
        if kind is not None:
            try:
                value = kind(value)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
                raise bad(str(err)) from None
    if action.choices is not None and value not in action.choices:
        raise bad(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


