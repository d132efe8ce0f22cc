"""Each matrix rule's options as a user sees them, generated from the code: the argument, its config key, its
default (the constructor's signature, or the table the rule resolves a None default with), what it allows (the
rule's `options` declaration) and where the default comes from (the rule's `provenance`).

docs/optimizers.md holds one such table per rule between `<!-- options: NAME -->` and `<!-- end options -->`;
tests/test_docs.py keeps them equal to this, and `python -m optim.reference docs/optimizers.md` rewrites them.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

import torch

from optim import OPTIMIZERS
from optim.base import MatrixOptimizer

PER_GROUP_KEYS = {"lr": "optim.lr", "weight_decay": "optim.weight_decay"}
MARKER = re.compile(r"<!-- options: (\w+) -->\n.*?<!-- end options -->", re.S)


def _shown(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return f'"{str(value).removeprefix("torch.")}"'
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default_of(cls: type[MatrixOptimizer], arg: str, value: Any) -> str:
    """A constructor default in words: the value, or what a None default resolves to."""
    if value is not None:
        return _shown(value)
    if arg in cls.dependent_defaults:
        option, table = cls.dependent_defaults[arg]
        return "by " + option + ": " + ", ".join(f"{_shown(v)} ({k})" for k, v in table.items())
    if arg == "comm_dtype":
        return "= ns_dtype"
    return "None"


def option_rows(cls: type[MatrixOptimizer]) -> list[tuple[str, str, str, str, str]]:
    """(argument, config key, default, allowed, provenance) for every constructor argument but the params."""
    declared = {option.arg: option for option in cls.options}
    rows = []
    for arg, parameter in inspect.signature(cls.__init__).parameters.items():
        if arg in ("self", "params"):
            continue
        option = declared.get(arg)
        key = (
            f"`optim.{option.key}`"
            if option
            else f"`{PER_GROUP_KEYS[arg]}`"
            if arg in PER_GROUP_KEYS
            else "constructor only"
        )
        if option is None:
            allowed = "-"
        elif option.choices:
            allowed = ", ".join(option.choices)
        elif option.kind is not None:
            allowed = option.kind.__name__
        else:
            low = "" if option.minimum is None else f">= {option.minimum:g}"
            high = "" if option.below is None else f"< {option.below:g}"
            allowed = " and ".join(filter(None, (low, high)))
        default = default_of(cls, arg, parameter.default)
        rows.append((arg, key, default, allowed, cls.provenance.get(arg, "project")))
    return rows


def options_table(cls: type[MatrixOptimizer]) -> str:
    lines = ["| argument | config key | default | allowed | provenance |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in option_rows(cls)]
    return "\n".join(lines)


def with_tables(text: str) -> str:
    """`text` with every marked options table regenerated."""
    classes = {cls.__name__: cls for cls in OPTIMIZERS.values()}

    def table(match: re.Match) -> str:
        name = match.group(1)
        return f"<!-- options: {name} -->\n{options_table(classes[name])}\n<!-- end options -->"

    return MARKER.sub(table, text)


def main(argv: list[str]) -> int:
    """Rewrite the marked tables of the given markdown files."""
    for path in map(Path, argv):
        path.write_text(with_tables(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
