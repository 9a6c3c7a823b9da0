"""``docs/flags.md``, written from the parser so that it cannot drift: every flag of ``--help``, grouped as there,
with its default and help; the other tools' spellings are on docs/compatibility.md.

    python -m cli.flagsdoc            # rewrites docs/flags.md
    python -m cli.flagsdoc --check    # exit 1 when docs/flags.md differs from what the parser would write
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "flags.md")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").replace("%%", "%")


def _default(action: argparse.Action) -> str:
    if action.default is None or action.default == argparse.SUPPRESS:
        return ""
    if isinstance(action.default, list):
        return f"`{','.join(map(str, action.default))}`" if action.default else ""
    return f"`{action.default}`"


def _flag(action: argparse.Action) -> str:
    name = action.option_strings[0]
    if action.nargs == "?" and action.const is True:  # a boolean: --x, --x=True/False, --no-x
        return f"`{name}`, `--no-{name[2:]}`"
    if action.choices is not None:
        return f"`{name} {{{','.join(map(str, action.choices))}}}`"
    kind = getattr(action.type, "__name__", "")
    value = action.metavar or ("N" if kind == "int" else "X" if kind in ("float", "finite_float") else "VALUE")
    return f"`{name} {value}`"


def render() -> str:
    """The page, from the parser ``--help`` prints."""
    from cli.parser import build_parser

    parser = build_parser()
    lines = ["# Flags", "", "Every flag of `python main.py --help`, by group, with its default (written from the parser by "
             "`python -m cli.flagsdoc`; a test fails when this page differs from it). Any flag can also be a key "
             "of a `--config` yaml file. The spellings of other tools are on [compatibility.md](compatibility.md).",
             ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS and a.option_strings
                   and a.dest not in ("help", "help_all")]
        if not actions:
            continue
        title = {"options": "general"}.get(group.title, group.title)
        lines += [f"## {title}", "", "| flag | default | what it does |", "|---|---|---|"]
        lines += [f"| {_flag(a)} | {_default(a)} | {_cell(a.help or '')} |" for a in actions]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description="write docs/flags.md from the parser").parse_known_args(argv)[1]
    text = render()
    if "--check" in args:
        current = open(PAGE, encoding="utf-8").read() if os.path.isfile(PAGE) else ""
        if current != text:
            print(f"{PAGE} differs from the parser; rewrite it with: python -m cli.flagsdoc", file=sys.stderr)
            return 1
        return 0
    with open(PAGE, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
