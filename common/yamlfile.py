"""Reading a yaml file that must hold a mapping (a ``--config``, a sweep file, a run's config.yaml): the safe
loader only (no python tags ever run), and any problem one :class:`common.errors.UserError` line."""
from __future__ import annotations

import yaml

from common.errors import UserError, first_line


def kind(value) -> str:
    """A yaml value's kind, in words."""
    return {list: "list", dict: "mapping", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def read_mapping(path: str, what: str, fix: str = "", of: str = "") -> dict:
    """The mapping in ``path`` ({} for an empty file). ``what`` names the file in the message, ``of`` says what the
    mapping holds ("of flag names to values"), ``fix`` ends the line ("; restore it ...")."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        raise UserError(f"{what} is not valid yaml ({first_line(err)}){fix}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{what} must be a mapping{of and ' ' + of}, not a {kind(values)}{fix}")
    return values
