"""Dataclass fields as argparse flags, with the conventions of transformers' ``HfArgumentParser`` (``--a_b`` and
``--a-b``, a bare ``--flag`` for a bool, ``--no_flag`` for one that defaults to True, ``Literal`` -> choices), in the
standard library alone, so that ``train.py --help`` and a bad value answer before torch is imported."""

import argparse
import dataclasses
import typing
from typing import Literal


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends the default to each help text, unless the text already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text or action.default in (None, False) else super()._get_help_string(action)


def str_to_bool(value) -> bool:
    text = str(value).lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def add_fields(group, dtype) -> None:
    """One flag per dataclass field, with the conventions of transformers' HfArgumentParser (``--a_b`` and
    ``--a-b``, ``--flag`` alone for a bool, ``--no_flag`` for a bool that defaults to True, Literal -> choices)."""
    hints = typing.get_type_hints(dtype)
    for f in dataclasses.fields(dtype):
        kind, meta = hints[f.name], dict(f.metadata)
        names = [f"--{f.name}", *([f"--{f.name.replace('_', '-')}"] if "_" in f.name else []), *meta.pop("aliases", [])]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = {"dest": f.name, "default": default, **meta}
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if kind is bool or options == [bool]:
            kwargs.update(type=str_to_bool, nargs="?", const=True)
        elif typing.get_origin(kind) is Literal:
            kwargs.update(choices=typing.get_args(kind))
        else:
            kwargs.setdefault("type", options[0] if options else kind)
        group.add_argument(*names, **kwargs)
        if default is True:
            group.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)


def bare_booleans(parser, dtype) -> None:
    """Every ``bool`` and ``bool | None`` field a switch that also takes a value (``--disable_tqdm`` alone or
    ``--disable_tqdm false``), as transformers' parser does for plain ``bool``: its ``bool | None`` fields
    (``--disable_tqdm``, ...) otherwise demand a value."""
    hints = typing.get_type_hints(dtype)
    booleans = {name for name, kind in hints.items() if kind is bool or bool in typing.get_args(kind)}
    for action in parser._actions:
        if action.dest in booleans and action.nargs is None and not action.option_strings[0].startswith("--no_"):
            action.nargs, action.const, action.type = "?", True, str_to_bool
