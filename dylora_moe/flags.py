"""Command-line manners shared by the two commands (``train.py`` / ``dylora-moe-train`` and ``python -m
dylora_moe.evaluate``): no abbreviated flags, the closest flag suggested for a misspelt one, the command's name.

Standard library only: a misspelt flag is answered before torch, transformers or wandb are touched.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path

# Short names people type from other tools, and what they mean here (suggested only where the command has the flag).
ALIASES = {
    "--lr": "--learning_rate",
    "--epochs": "--num_train_epochs",
    "--bs": "--per_device_train_batch_size",
    "--experts": "--num_experts",
    "--rank": "--lora_r",
    "--r": "--lora_r",
    "--alpha": "--lora_alpha",
    "--dropout": "--lora_dropout",
    "--model": "--model_name",
    "--out": "--output_dir",
    "--output": "--output_dir",
    "--steps": "--max_steps",
    "--k": "--top_k",
}
UNRECOGNIZED = "unrecognized arguments: "


def closest(flag: str, known: Iterable[str]) -> str | None:
    """The known flag ``flag`` was most likely meant to be (the alias table, then difflib), or None."""
    known = set(known)
    if ALIASES.get(flag) in known:
        return ALIASES[flag]
    match = difflib.get_close_matches(flag, sorted(known), n=1, cutoff=0.75)
    return match[0] if match else None


def with_suggestion(message: str, known: Iterable[str]) -> str:
    """An argparse error message, with "did you mean" for the first unrecognized flag that has a close match."""
    if not message.startswith(UNRECOGNIZED):
        return message
    for token in message[len(UNRECOGNIZED) :].split():
        if token.startswith("-") and (match := closest(token.split("=")[0], known)):
            return f"{message} (did you mean {match}?)"
    return message


def unrecognized(tokens: list[str], known: Iterable[str]) -> list[str]:
    """The flags of ``tokens`` (leftovers of ``parse_known_args``) that no parser knows, each with its values."""
    known, left, keep = set(known), [], False
    for token in tokens:
        if token.startswith("-"):
            keep = token.split("=")[0] not in known
        if keep:
            left.append(token)
    return left


def dataclass_flags(module: str, cls: str) -> set[str] | None:
    """The flags ``HfArgumentParser`` makes of the fields of dataclass ``cls`` in ``module`` (``--a_b``, ``--a-b``,
    ``--no_a_b``), read from the source without importing it (transformers takes seconds); None if not found."""
    try:
        spec = importlib.util.find_spec(module.split(".")[0])
        path = Path(spec.origin).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
        tree = ast.parse(path.read_text())
    except (AttributeError, OSError, SyntaxError, ValueError):
        return None
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            names |= {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    if not names:
        return None
    return {f"--{p}{n}" for n in names for p in ("", "no_")} | {
        f"--{p}{n.replace('_', '-')}" for n in names for p in ("", "no-")
    }


def program(default: str, installed: str) -> str:
    """The name usage and errors show: ``installed`` when run as the installed script, else ``default``."""
    return installed if Path(sys.argv[0]).name == installed else default


class SuggestingParser(argparse.ArgumentParser):
    """No abbreviations; "did you mean" on an unrecognized flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message):
        super().error(with_suggestion(message, self._option_string_actions))
