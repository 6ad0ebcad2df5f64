"""The README and the docs are documents that run: the Python blocks of each page, in order, as one script (in a
scratch folder, which the examples write into: moe_ckpt/, old_run/); every ``train.py`` / ``dylora-moe-train`` /
``python -m dylora_moe.evaluate`` command of their shell blocks is checked against the command's own parser; the
blocks marked ``<!-- ci:NAME -->`` are run by .ci/run. A shell block that stands for output or for a command of
another tool is a ```text / ```console block, or a ```bash block preceded by ``<!-- no-run: why -->``; a Python block
that cannot run here (a GPU, a hub model) is preceded by ``<!-- no-run: why -->`` too. Links between the pages
resolve; the defaults in docs/model.md's settings table are DyLoRAMoEConfig's."""

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^(?:<!-- (?P<mark>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)^```", flags=re.S | re.M)


def blocks(path: Path, lang: str) -> list[str]:
    """The ``lang`` blocks of ``path`` that run (not marked ``no-run``)."""
    found = BLOCK.finditer(path.read_text())
    return [m["code"] for m in found if m["lang"] == lang and not (m["mark"] or "").startswith("no-run")]


def python_blocks(path: Path = README) -> list[str]:
    return blocks(path, "python")


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 8  # the finder sees the blocks (the test below is not vacuous)


def test_readme_python_blocks_run_top_to_bottom_in_one_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for i, block in enumerate(python_blocks(), start=1):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"README python block {i} fails: {type(err).__name__}: {err}\n{block}") from err
    assert (tmp_path / "moe_ckpt" / "dylora_moe_config.json").is_file()


@pytest.mark.parametrize("page", [p for p in PAGES if p != README and python_blocks(p)], ids=lambda p: p.name)
def test_docs_python_blocks_run_top_to_bottom_in_one_process(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": page.stem}
    for i, block in enumerate(python_blocks(page), start=1):
        try:
            exec(compile(block, f"{page.name} python block {i}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{page.name} python block {i} fails: {type(err).__name__}: {err}\n{block}") from err


def commands(page: Path) -> list[list[str]]:
    """The train.py and evaluation command lines of the page's running bash blocks (continuations joined, comments
    and environment assignments dropped), as argv lists starting with the command."""
    found = []
    for block in blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"\w+=\S*", words[0]):
                words = words[1:]
            if words[:2] == ["python", "train.py"] or words[:1] == ["dylora-moe-train"]:
                found.append(["train.py", *words[2 if words[0] == "python" else 1 :]])
            elif words[:3] == ["python", "-m", "dylora_moe.evaluate"]:
                found.append(["evaluate", *words[3:]])
            elif words[:1] == ["torchrun"] and "train.py" in words:
                found.append(["train.py", *words[words.index("train.py") + 1 :]])
    return found


def test_the_command_finder_sees_the_commands():
    found = [c for page in PAGES for c in commands(page)]
    assert ["train.py", "--max_steps", "4", "--training_subset", "10", "--eval_subset", "10", "--output_dir",
            "outputs/quickstart"] in found  # fmt: skip
    assert any(c[0] == "evaluate" for c in found)


@pytest.mark.parametrize("page", [p for p in PAGES if commands(p)], ids=lambda p: p.name)
def test_every_command_in_the_docs_parses(page):
    """Flags and choices of each command exist (nothing runs: a GPU job is checked as well as a CPU one)."""
    from dylora_moe.evaluate import cli as evaluate_cli
    from dylora_moe.flags import dataclass_flags, unrecognized
    from dylora_moe.train import args as train_args

    trainer_flags = dataclass_flags("transformers.training_args", "TrainingArguments") or set()
    for command, *argv in commands(page):
        if "--help" in argv or "--help_trainer" in argv:
            continue
        if command == "train.py":
            parser = train_args.build_parser()
            parser.exit = parser.error = _fail(page, command, argv)
            _, unknown = parser.parse_known_args(argv)
            wrong = unrecognized(unknown, set(parser._option_string_actions) | trainer_flags)
            assert not wrong, f"{page.name}: {command} {shlex.join(argv)}: unknown flags {wrong}"
        else:
            parser = evaluate_cli.parser()
            parser.exit = parser.error = _fail(page, command, argv)
            parser.parse_args(argv)


def _fail(page, command, argv):
    def fail(*args):
        raise AssertionError(f"{page.name}: {command} {shlex.join(argv)}: {args}")

    return fail


def test_links_between_the_pages_resolve():
    missing = []
    for page in [*PAGES, REPO / "CHANGELOG.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            path = (page.parent / target).resolve()
            if not path.exists():
                missing.append(f"{page.relative_to(REPO)} -> {target}")
    assert not missing, missing


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 350
    assert "<!-- ci:setup -->" in text and "<!-- ci:main-job -->" in text and "<!-- ci:tests -->" in text


def test_the_settings_table_quotes_the_configs_defaults():
    """docs/model.md lists each setting's default in bold: they are DyLoRAMoEConfig's (the one place they live)."""
    from dylora_moe import DyLoRAMoEConfig

    defaults, checked = DyLoRAMoEConfig(), 0
    for row in re.findall(r"^\| (`\w+`(?:, `\w+`)*) \| ([^|]*) \|", (REPO / "docs" / "model.md").read_text(), re.M):
        names, values = re.findall(r"`(\w+)`", row[0]), re.findall(r"\*\*`?([^*`]+)`?\*\*", row[1])
        for name, value in zip(names, values, strict=True):
            assert value == repr(getattr(defaults, name)).replace("'", '"'), (name, value)
            checked += 1
    assert checked >= 12


def test_the_training_defaults_table_quotes_the_code():
    """docs/training.md's table of the defaults that depend on the base model is args.py's two dicts."""
    from dylora_moe.train.args import ORIGINAL_DEFAULTS, TINY_DEFAULTS

    rows = re.findall(r"^\| `--(\w+)` \| ([^|]+) \| ([^|]+) \|$", (REPO / "docs" / "training.md").read_text(), re.M)
    table = {name: (tiny.strip(), other.strip()) for name, tiny, other in rows}
    assert table == {name: (str(TINY_DEFAULTS[name]), str(ORIGINAL_DEFAULTS[name])) for name in TINY_DEFAULTS}
