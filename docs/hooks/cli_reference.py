"""mkdocs hook: the CLI reference, generated at build time from the parser ``hf-attn-swap`` itself builds.

``hf_attn_swap.cli.build_parser()`` turns ``COMMANDS`` and their option dataclasses into argparse parsers; this hook
renders, for every command, its ``--help`` and a table of its flags with the dataclass field behind each, in place
of the ``<!-- cli-reference -->`` marker of ``reference/cli.md``. Nothing is copied by hand, so the page cannot
drift from the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

PLACEHOLDER = "<!-- cli-reference -->"
HELP_WIDTH = "100"  # argparse wraps --help to $COLUMNS: fixed, so the page does not depend on the terminal


def on_page_markdown(markdown: str, page, config, files) -> str:
    if PLACEHOLDER not in markdown:
        return markdown
    return markdown.replace(PLACEHOLDER, render_cli_reference())


def render_cli_reference() -> str:
    os.environ["COLUMNS"] = HELP_WIDTH
    from hf_attn_swap.cli import COMMANDS, build_parser

    parser = build_parser()
    sections = ["```text\n" + parser.format_help() + "```"]
    for name, command in COMMANDS.items():
        sections.append(command_section(name, command, parser.commands[name]))
    return "\n\n".join(sections) + "\n"


def command_section(name: str, command, sub: argparse.ArgumentParser) -> str:
    owners = {f.name: cls for cls in command.options for f in dataclasses.fields(cls)}
    sources = ", ".join(f"`{cls.__module__}.{cls.__qualname__}`" for cls in command.options)
    rows = [flag_row(action, owners, sub.prog) for action in sub._actions if not _is_help(action)]
    table = ["| argument | value | default | field | help |", "|---|---|---|---|---|", *rows]
    return "\n\n".join(
        [
            f"### {name}",
            _cell(command.description or command.help, table=False),
            f"Options: {sources}.",
            "```text\n" + sub.format_help() + "```",
            "\n".join(table),
        ]
    )


def flag_row(action: argparse.Action, owners: dict, prog: str) -> str:
    name = ", ".join(f"`{flag}`" for flag in action.option_strings) or f"`{action.dest}` (positional)"
    owner = owners.get(action.dest)
    field = f"`{owner.__name__}.{action.dest}`" if owner else "—"
    return "| " + " | ".join([name, _value(action), _default(action), field, _help(action, prog)]) + " |"


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "switch"
    if action.choices:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    metavar = action.metavar or (
        action.type.__name__ if isinstance(action.type, type) else action.dest.upper()
    )
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    return f"`{metavar}`" + (" …" if many else "")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
        return "—"
    return f"`{action.default}`"


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    try:
        text = text % dict(params, prog=prog)
    except (KeyError, TypeError, ValueError):
        pass
    return _cell(text)


def _cell(text: str, table: bool = True) -> str:
    text = " ".join(str(text).split())
    return text.replace("|", "\\|") if table else text


def _is_help(action: argparse.Action) -> bool:
    return isinstance(action, argparse._HelpAction)
