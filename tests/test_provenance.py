"""One machine() and one commit() (dylora_moe.provenance) for run.json, benchmark rows and the compile report."""

import re

from dylora_moe import provenance
from dylora_moe.train import cli


def test_commit_is_the_short_head_with_a_dirty_marker(monkeypatch):
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?|unknown", provenance.commit())
    assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?|unknown", provenance.commit("kernels"))


def test_a_copy_without_git_names_its_commit(monkeypatch):
    monkeypatch.setenv(provenance.COMMIT_ENV, "abc1234")
    assert provenance.commit() == "abc1234"


def test_machine_names_the_device():
    assert re.search(r"visible\)$|-core CPU .*no GPU$", provenance.machine())


def test_the_apps_use_the_one_implementation():
    conftest = (provenance.REPO / "benchmarks" / "conftest.py").read_text()
    assert "from dylora_moe.provenance import commit" in conftest and "def commit(" not in conftest
    assert (cli.commit, cli.machine) == (provenance.commit, provenance.machine)
