"""The corpora module (dylora_moe.corpora): where the data is found on a fresh clone, the hub as the default when no
local folder exists, the one-line error offline, and the domain registry. The hub is monkeypatched: no network."""

import pytest

from dylora_moe import corpora
from dylora_moe.corpora import DataError, default_data_dir, load_domain
from dylora_moe.train import args as train_args


@pytest.fixture
def fresh_clone(monkeypatch, tmp_path):
    """No DYLORA_DATA_DIR and no ../shared/data next to the repository, as on a fresh clone."""
    monkeypatch.delenv("DYLORA_DATA_DIR", raising=False)
    monkeypatch.setattr(corpora, "SHARED_DATA_DIR", tmp_path / "no-shared-data")


def test_default_data_dir_is_the_env_then_the_shared_folder_then_the_hub(monkeypatch, tmp_path, fresh_clone):
    assert default_data_dir() == "hub"
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setattr(corpora, "SHARED_DATA_DIR", shared)
    assert default_data_dir() == str(shared)
    monkeypatch.setenv("DYLORA_DATA_DIR", str(tmp_path / "mine"))
    assert default_data_dir() == str(tmp_path / "mine")  # an explicit folder is taken as given (errors if absent)


class FakeHub:
    """``datasets`` with its hub replaced by a few rows per corpus; records what was asked for."""

    def __init__(self, datasets):
        self.Dataset, self.calls = datasets.Dataset, []

    def load_dataset(self, name, config):
        self.calls.append((name, config))
        if name == "sahil2801/CodeAlpaca-20k":
            rows = {"instruction": [f"do {i}" for i in range(20)], "output": [f"done {i}" for i in range(20)]}
            return {"train": self.Dataset.from_dict(rows)}
        return {split: self.Dataset.from_dict({"text": [f"{split} task {i}" for i in range(10)]})
                for split in ("train", "test", "validation", "prompt")}  # fmt: skip


def test_the_main_job_reads_the_hub_when_no_local_folder_is_found(monkeypatch, fresh_clone):
    datasets = pytest.importorskip("datasets")
    hub = FakeHub(datasets)
    monkeypatch.setattr(corpora, "datasets_package", lambda: hub)
    args = train_args.parse_args(["--output_dir", "unused"])
    assert args.data_dir == "hub"
    splits = {domain: load_domain(args.data_dir, domain) for domain in corpora.DOMAINS}
    assert hub.calls == [("sahil2801/CodeAlpaca-20k", None), ("google-research-datasets/mbpp", "full")]
    assert sorted(splits["code_alpaca"].texts["train"] + splits["code_alpaca"].texts["validation"]) == sorted(
        f"do {i}\ndone {i}" for i in range(20)
    )
    assert sum(len(texts) for texts in splits["mbpp"].texts.values()) == 40


def test_offline_the_error_names_the_two_files_and_how_to_point_at_them(monkeypatch, fresh_clone):
    class Offline:
        @staticmethod
        def load_dataset(name, config):
            raise ConnectionError(
                "Couldn't reach 'sahil2801/CodeAlpaca-20k' on the Hub (LocalEntryNotFoundError)\nmore"
            )

    monkeypatch.setattr(corpora, "datasets_package", lambda: Offline)
    with pytest.raises(DataError) as caught:
        load_domain(default_data_dir(), "code_alpaca")
    message = str(caught.value)
    assert "\n" not in message
    assert "code_alpaca_2k.json and mbpp.jsonl" in message
    assert "--data_dir" in message and "DYLORA_DATA_DIR" in message


def test_a_domain_is_one_registry_entry():
    assert corpora.DOMAINS == ("code_alpaca", "mbpp")
    for name, domain in corpora.REGISTRY.items():
        assert domain.name == name and domain.files and 0 < domain.held_out < 1
    assert corpora.REGISTRY["mbpp"].split_names == ("train", "validation", "test")
    assert corpora.REGISTRY["code_alpaca"].to_text({"instruction": "a", "output": "b"}, "row") == "a\nb"


def test_a_new_domain_entry_is_read_and_split(monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    entry = corpora.Domain("prose", "org/prose", None, ("prose.jsonl",), corpora.mbpp_text, held_out=0.5)
    monkeypatch.setitem(corpora.REGISTRY, "prose", entry)
    (tmp_path / "prose.jsonl").write_text("".join(f'{{"text": "line {i}"}}\n' for i in range(10)))
    splits = load_domain(tmp_path, "prose")
    assert sorted(splits.texts) == ["train", "validation"]
    assert len(splits.texts["train"]) == 5 and len(splits.texts["validation"]) == 5


def test_the_evaluation_reads_mbpp_from_the_hub_on_a_fresh_clone(monkeypatch, fresh_clone):
    from dylora_moe.evaluate.problems import load_problems

    row = {"task_id": 11, "text": "t", "code": "pass", "test_list": ["assert True"], "test_setup_code": ""}

    class Hub:
        @staticmethod
        def load_dataset(name, config):
            return {"test": [row]}

    monkeypatch.setattr(corpora, "datasets_package", lambda: Hub)
    assert [p.task_id for p in load_problems("mbpp")] == [11]
