"""Every dotted ``dylora_moe.*`` name written in the code, its docstrings and the docs names something that exists
(``help()`` and the docs show them; a renamed module must not leave its old name behind). CHANGELOG.md is history:
former names are its subject."""

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r"(?<![\w./-])dylora_moe(?:\.[A-Za-z_]\w*)+")


def _files() -> list[Path]:
    package = [p for p in (REPO / "dylora_moe").rglob("*.py") if p.relative_to(REPO).parts[1] != "kernels"]
    tests = [p for p in (REPO / "tests").rglob("*.py") if p != Path(__file__)]  # this file names broken ones on purpose
    others = [*(REPO / "kernels").rglob("*.py"), *(REPO / "benchmarks").glob("*.py"), *tests]
    return [*package, *others, REPO / "train.py", REPO / "README.md", *(REPO / "docs").glob("*.md")]


def _names() -> dict[str, str]:
    found = {}
    for path in _files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in NAME.finditer(line):
                name = match.group(0)
                if not name.endswith((".py", ".md")):  # a file name, not a Python name
                    found.setdefault(name, f"{path.relative_to(REPO)}:{number}")
    return found


def resolves(name: str) -> bool:
    """Whether ``name`` is a module, or an attribute chain inside the longest importable module prefix."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def test_the_resolver_tells_names_apart():
    assert resolves("dylora_moe.modules.routing.decide_routing") and resolves("dylora_moe.kernels")
    assert not resolves("dylora_moe.routing.decide_routing") and not resolves("dylora_moe.layer.MoELoRALinear")


def test_every_dotted_name_resolves():
    names = _names()
    assert len(names) > 30 and "dylora_moe.config" in names
    broken = [f"{where}: {name}" for name, where in sorted(names.items(), key=lambda kv: kv[1]) if not resolves(name)]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("cls", ["DyLoRA_MoE", "MoELoRALinear", "MoELoRAMLP", "DynamicHybridRouter", "ExpertManager"])
def test_public_classes_document_init_and_forward(cls):
    import torch

    target = getattr(importlib.import_module("dylora_moe"), cls)
    for method in ("__init__", "forward"):
        if method == "forward" and not issubclass(target, torch.nn.Module):
            continue
        own = getattr(target, method).__doc__
        inherited = getattr(torch.nn.Module if method == "forward" else object, method).__doc__
        assert own and own != inherited and method in target.__dict__, f"{cls}.{method} has no docstring of its own"
