"""The one way to publish: staging names every writer uses, and a file replaced in one rename."""

import pytest

from dylora_moe.io.atomic_folder import is_staging_name, new_staging, staging_root, write_text_atomic


def test_staging_names_of_every_writer_are_recognised(tmp_path):
    dest = tmp_path / "checkpoint-4"
    assert is_staging_name(staging_root(dest).name)  # the Trainer's root: .staging-checkpoint-4/checkpoint-4
    assert is_staging_name(new_staging(dest).name)  # beside its destination: .checkpoint-4.tmp-<pid>-<random>
    assert is_staging_name(new_staging(staging_root(dest)).name)
    for name in ("checkpoint-4", ".hidden-user-folder", "final", "tmp-1", ".tmp-1"):
        assert not is_staging_name(name), name


def test_write_text_atomic_replaces_whole_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    write_text_atomic(path, "old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["run.json"]

    def refuse(*_):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "newer")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["run.json"]
