"""Checkpoints under faults: saves never delete what they did not write and are atomic; loads are all-or-nothing.

Every load failure here must leave the target model bitwise unchanged and name the file at fault.
"""

import json
import os
import pickle
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from moe_models import randomize_experts, tiny_llama
from safetensors.torch import load_file, save_file

from dylora_moe import DyLoRA_MoE
from dylora_moe.io import atomic_folder
from dylora_moe.io import checkpoint as ckpt
from dylora_moe.io.checkpoint import CheckpointError, CheckpointFileMissing

REPO = Path(__file__).resolve().parents[2]


def make_moe(seed=0, num_experts=3):
    moe = DyLoRA_MoE(tiny_llama(), num_experts=num_experts, lora_r=4, lora_alpha=8, kernel="eager", top_k=2)
    randomize_experts(moe.handle.layers.values(), seed=seed + 2)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in moe.handle.layers.values():
            layer.lora_A.normal_()
        moe.router.gate.weight.normal_()
    return moe.eval()


def reload(folder):
    """DyLoRA_MoE.from_pretrained without depending on its argument order (helper "api" changes it)."""
    return ckpt.load_checkpoint_model(DyLoRA_MoE, folder, tiny_llama(), kernel="eager")


def snapshot(moe) -> dict:
    return {k: v.detach().clone() for k, v in moe.state_dict().items()}


def assert_unchanged(moe, before: dict) -> None:
    after = moe.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value) and after[key].dtype == value.dtype, key


def tree(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def experts_equal(moe, other) -> bool:
    return all(
        torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
        for a, b in zip(moe.handle.layers.values(), other.handle.layers.values())
    ) and torch.equal(moe.router.gate.weight, other.router.gate.weight)


# ----- saves never delete what they did not write ------------------------------------------------------------------


def test_save_into_current_folder_with_other_files_refuses(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"not a DyLoRA_MoE checkpoint \(data/, notes.txt\).*nothing was written"):
        make_moe().save_pretrained(".")
    assert tree(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["data", "notes.txt"]  # no staging folder left either


@pytest.mark.parametrize(
    "foreign, named",
    [
        ("notes.txt",) * 2,
        ("optimizer.pt",) * 2,
        ("expert_0/README.md",) * 2,
        ("expert_9/x.bin",) * 2,
        ("sub/x", "sub/"),
    ],
)
def test_save_over_a_checkpoint_with_a_foreign_file_refuses(tmp_path, foreign, named):
    target = tmp_path / "ckpt"
    make_moe(seed=1).save_pretrained(target)
    (target / foreign).parent.mkdir(exist_ok=True)
    (target / foreign).write_text("someone else's")
    before = tree(tmp_path)
    with pytest.raises(CheckpointError, match=f"cannot save a checkpoint to {re.escape(str(target))}: .*{named}"):
        make_moe(seed=2).save_pretrained(target)
    assert tree(tmp_path) == before


def test_save_into_folder_of_checkpoint_names_without_config_refuses(tmp_path):
    """A lone router.safetensors may be the user's own DynamicHybridRouter.save: not ours to replace."""
    target = tmp_path / "ckpt"
    target.mkdir()
    make_moe().router.save(target / "router.safetensors")
    before = tree(tmp_path)
    with pytest.raises(CheckpointError, match="no dylora_moe_config.json"):
        make_moe().save_pretrained(target)
    assert tree(tmp_path) == before


def test_save_onto_a_file_refuses(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="it is a file, not a folder"):
        make_moe().save_pretrained(target)
    assert target.read_bytes() == b"precious" and os.listdir(tmp_path) == ["model.bin"]


def test_save_into_empty_current_folder_writes_there(tmp_path, monkeypatch):
    """The shell's working folder stays the same folder (same inode), now holding the checkpoint."""
    monkeypatch.chdir(tmp_path)
    inode = os.stat(".").st_ino
    moe = make_moe()
    moe.save_pretrained(".")
    assert os.stat(".").st_ino == inode == os.stat(tmp_path).st_ino
    assert "dylora_moe_config.json" in os.listdir(".")
    assert experts_equal(reload("."), moe)


def test_save_over_an_earlier_checkpoint_in_the_current_folder(tmp_path, monkeypatch):
    """Replacing the working folder itself: the process ends up in the new checkpoint at the same path."""
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path / "ckpt")
    make_moe(seed=1).save_pretrained(".")
    new = make_moe(seed=2)
    new.save_pretrained(".")
    assert Path.cwd() == (tmp_path / "ckpt").resolve() and os.listdir(tmp_path) == ["ckpt"]
    assert experts_equal(reload("."), new)


def test_save_into_empty_folder_and_new_nested_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    moe = make_moe()
    moe.save_pretrained(tmp_path / "empty")
    moe.save_pretrained(tmp_path / "a" / "b" / "c")
    for folder in (tmp_path / "empty", tmp_path / "a" / "b" / "c"):
        assert experts_equal(reload(folder), moe)


@pytest.mark.parametrize("swap", ["exchange", "two_renames"])
def test_save_over_an_earlier_checkpoint_replaces_it(tmp_path, monkeypatch, swap):
    if swap == "two_renames":  # an OS or file system without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(atomic_folder, "exchange", lambda a, b: False)
    target = tmp_path / "ckpt"
    make_moe(seed=1).save_pretrained(target)
    new = make_moe(seed=2)
    new.save_pretrained(target)
    assert os.listdir(tmp_path) == ["ckpt"]
    assert experts_equal(reload(target), new)


def test_exchange_swaps_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b" / "x").write_text("b")
    if not atomic_folder.exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here (the two-rename fallback is tested)")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        target = tmp_path / "ckpt"
        for _ in range(2):  # a fresh save, then one replacing it
            make_moe().save_pretrained(target)
            for path in [target, *target.rglob("*")]:
                expected = (0o777 if path.is_dir() else 0o666) & ~umask
                assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))
    finally:
        os.umask(old)


def test_stale_staging_folders_are_removed_by_the_next_save(tmp_path):
    target = tmp_path / ".staging-checkpoint-4"  # the Trainer's staging name: ours is "..staging-checkpoint-4.tmp-*"
    dead = 2**31 - 2  # above any pid_max: no such process
    stale = [tmp_path / f"..staging-checkpoint-4.tmp-{dead}-0a1b2c3d", tmp_path / "..staging-checkpoint-4.tmp-k2j4h5l6"]
    for folder in stale:  # a killed save's half checkpoint; the second name is the earlier mkdtemp style
        (folder / "expert_0").mkdir(parents=True)
        (folder / "expert_0" / "adapter_config.json").write_text("{")
    foreign = tmp_path / f"..staging-checkpoint-4.tmp-{dead}-ffffffff"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a checkpoint file: left alone")
    live = tmp_path / f"..staging-checkpoint-4.tmp-{os.getppid()}-00000000"  # a live process may be saving there
    live.mkdir()
    other = tmp_path / f"..other.tmp-{dead}-00000000"  # another destination's: left alone
    other.mkdir()
    make_moe().save_pretrained(target)
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, foreign.name, live.name, other.name])


class _Killed(BaseException):
    """Stands for a kill (not an Exception: no handler in the save path may swallow it)."""


def _raise(*args, **kwargs):
    raise _Killed


@pytest.mark.parametrize("point", ["expert_file", "router", "config", "publish", "after_swap"])
def test_failed_save_leaves_previous_checkpoint_intact_and_loadable(tmp_path, monkeypatch, point):
    target = tmp_path / "ckpt"
    old = make_moe(seed=1)
    old.save_pretrained(target)
    before = tree(tmp_path)
    new = make_moe(seed=2)
    if point == "expert_file":  # the second expert's weights half written
        calls = []

        def half_save(tensors, path, metadata=None):
            calls.append(path)
            if len(calls) == 2:
                Path(path).write_bytes(b"\x00" * 100)
                raise _Killed
            save_file(tensors, path, metadata=metadata)

        monkeypatch.setattr(ckpt, "save_file", half_save)
    elif point == "router":
        monkeypatch.setattr(new.router, "save", _raise)
    elif point == "config":
        monkeypatch.setattr(ckpt, "model_settings", _raise)
    elif point == "publish":
        monkeypatch.setattr(ckpt, "publish", _raise)
    with pytest.raises(_Killed) if point != "after_swap" else _swap_then_fail(monkeypatch):
        new.save_pretrained(target)
    loaded = reload(target)
    if point == "after_swap":  # the new checkpoint was complete and published; the error came after
        assert experts_equal(loaded, new)
    else:
        assert tree(tmp_path) == before
        assert experts_equal(loaded, old)
    assert os.listdir(tmp_path) == ["ckpt"]


class _swap_then_fail:
    """Fail right after the swap, while the old checkpoint is being deleted."""

    def __init__(self, monkeypatch):
        real = atomic_folder.shutil.rmtree
        self.calls = 0

        def rmtree(path, *args, **kwargs):
            self.calls += 1
            real(path, *args, **kwargs)
            if self.calls == 1:
                raise _Killed

        monkeypatch.setattr(atomic_folder.shutil, "rmtree", rmtree)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        assert kind is _Killed and self.calls >= 1
        return True


_KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    sys.path[:0] = [sys.argv[2], str(Path(sys.argv[2]) / "io")]  # the test helpers, this file
    from test_checkpoint_faults import make_moe, experts_equal, reload
    from dylora_moe.io import atomic_folder
    from dylora_moe.io import checkpoint as ckpt

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def die_on_rename_into_place():  # the fallback replace, killed between its two renames
        atomic_folder.exchange = lambda a, b: False
        rename = os.rename
        def patched(src, dst):
            if Path(src).name.startswith(".ckpt.tmp-") and Path(dst).name == "ckpt":
                die()
            rename(src, dst)
        os.rename = patched

    points = {
        "mid_expert_file": lambda: setattr(ckpt, "save_file", lambda t, p, metadata=None: (
            Path(p).write_bytes(b"\\x01" * 64), die())),
        "before_publish": lambda: setattr(ckpt, "publish", die),
        "after_swap": lambda: setattr(atomic_folder.shutil, "rmtree", die),
        "between_two_renames": die_on_rename_into_place,
    }
    root = Path(sys.argv[1])
    old, new = make_moe(seed=1), make_moe(seed=2)

    def which(target):
        try:
            loaded = reload(target)
        except ckpt.CheckpointError as e:
            return str(e)
        return "old" if experts_equal(loaded, old) else "new" if experts_equal(loaded, new) else "other"

    report = {}
    for name, patch in points.items():
        target = root / name / "ckpt"
        old.save_pretrained(target)
        pid = os.fork()
        if pid == 0:  # the process that gets killed mid-save
            patch()
            new.save_pretrained(target)
            os._exit(3)  # not reached
        _, status = os.waitpid(pid, 0)
        result = {"killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "loads": which(target)}
        result["leftovers"] = sorted(p.name for p in target.parent.iterdir() if p.name != "ckpt")
        atomic_folder.remove_stale_staging(target, ckpt._holds_only_checkpoint_files, ckpt._is_checkpoint)
        result["after_recovery"] = which(target)  # what the next save finds before it writes
        new.save_pretrained(target)
        result["after_next_save"] = sorted(p.name for p in target.parent.iterdir())
        report[name] = result
    print(json.dumps(report))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkilled_save_leaves_a_loadable_checkpoint(tmp_path):
    """A real SIGKILL at four points of a save: the previous checkpoint (or, once swapped, the new one) loads, and
    the next save cleans up. Where the OS has no atomic exchange, a kill between the two renames leaves no folder
    at the destination: the load error says where the checkpoint is, and the next save puts it back first. One
    fresh interpreter forks one victim per point."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), str(REPO / "tests")],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(report) == sorted(["mid_expert_file", "before_publish", "after_swap", "between_two_renames"])
    for name, result in report.items():
        assert result["killed"], name
        assert result["after_next_save"] == ["ckpt"], (name, result)
        if name == "between_two_renames":
            assert "a save to it was interrupted and left a complete checkpoint in" in result["loads"], result
            assert len(result["leftovers"]) == 2, result  # the old checkpoint set aside, the complete new one
            assert result["after_recovery"] in ("old", "new"), result
            continue
        expected = "new" if name == "after_swap" else "old"
        assert result["loads"] == result["after_recovery"] == expected, (name, result)
        assert len(result["leftovers"]) == 1 and result["leftovers"][0].startswith(".ckpt.tmp-"), (name, result)


def test_failed_fallback_replace_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    """Two renames where there is no atomic exchange: if the second fails, the first is undone."""
    target = tmp_path / "ckpt"
    old = make_moe(seed=1)
    old.save_pretrained(target)
    before = tree(tmp_path)
    monkeypatch.setattr(atomic_folder, "exchange", lambda a, b: False)
    rename = os.rename

    failed = []

    def failing_rename(src, dst):
        if Path(dst) == target and not failed:  # the new checkpoint into place (not the undo that follows)
            failed.append(src)
            raise OSError("rename failed")
        rename(src, dst)

    monkeypatch.setattr(atomic_folder.os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        make_moe(seed=2).save_pretrained(target)
    monkeypatch.undo()
    assert tree(tmp_path) == before
    assert experts_equal(reload(target), old)


def test_failed_save_into_current_folder_leaves_it_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rename = os.rename
    calls = []

    def failing_rename(src, dst):
        if Path(dst).parent == tmp_path.resolve():
            calls.append(dst)
            if len(calls) == 3:  # the third entry moved into the folder
                raise OSError("rename failed")
        rename(src, dst)

    monkeypatch.setattr(atomic_folder.os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        make_moe().save_pretrained(".")
    assert os.listdir(tmp_path) == []


# ----- loads are all-or-nothing ------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    target = tmp_path / "ckpt"
    make_moe(seed=1).save_pretrained(target)
    return target


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_last_byte(path: Path) -> None:  # the last byte of a safetensors file is tensor data
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _write_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def _reseal(folder: Path, name: str) -> None:
    """Record ``name``'s current checksum in the config, as if the checkpoint had been saved that way."""
    import hashlib

    data = (folder / name).read_bytes()
    record = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write_json(folder / ckpt.CONFIG_NAME, lambda c: c["checkpoint"]["files"].__setitem__(name, record))


def _wrong_shape(folder: Path) -> None:
    path = folder / "expert_2" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key][:3]
    save_file(tensors, path, metadata={"format": "pt"})
    _reseal(folder, "expert_2/adapter_model.safetensors")


def _extra_tensor(folder: Path) -> None:
    path = folder / "expert_1" / "adapter_model.safetensors"
    save_file({**load_file(path), "base_model.model.lm_head.weight": torch.zeros(2, 2)}, path)
    _reseal(folder, "expert_1/adapter_model.safetensors")


def _integer_tensor(folder: Path) -> None:
    path = folder / "router.safetensors"
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors["expert_maturity"] = tensors["expert_maturity"].long()
    save_file(tensors, path, metadata=metadata)
    _reseal(folder, "router.safetensors")


def _wrong_rank(folder: Path) -> None:
    _write_json(folder / "expert_1" / "adapter_config.json", lambda c: c.__setitem__("r", 8))
    _reseal(folder, "expert_1/adapter_config.json")


def _edit_config(change):
    return lambda folder: _write_json(folder / "dylora_moe_config.json", change)


def _edit_file(name, change):
    return lambda folder: (folder / name).write_text(change((folder / name).read_text()))


def _remove(name):
    return lambda folder: (folder / name).unlink()


CONFIG, ROUTER = "dylora_moe_config.json", "router.safetensors"
CORRUPTIONS = {
    # name: (damage, file named in the error, words of the error)
    "truncated_last_expert": (lambda f: _truncate(f / "expert_2/adapter_model.safetensors"),
                              "expert_2/adapter_model.safetensors", "truncated"),
    "flipped_byte_in_tensor": (lambda f: _flip_last_byte(f / "expert_1/adapter_model.safetensors"),
                               "expert_1/adapter_model.safetensors", "does not match its checksum .* corrupted"),
    "flipped_byte_in_router": (lambda f: _flip_last_byte(f / ROUTER), ROUTER, "does not match its checksum"),
    "edited_adapter_config": (_edit_file("expert_0/adapter_config.json", lambda t: t.replace('"r": 4', '"r": 5')),
                              "expert_0/adapter_config.json", "does not match its checksum"),
    "missing_expert_file": (_remove("expert_1/adapter_model.safetensors"), "expert_1/adapter_model.safetensors",
                            "missing"),
    "missing_router": (_remove(ROUTER), ROUTER, "missing"),
    "missing_config": (_remove(CONFIG), CONFIG, "not a DyLoRA_MoE checkpoint"),
    "malformed_config": (lambda f: _truncate(f / CONFIG), CONFIG, "not valid JSON"),
    "config_not_an_object": (_edit_file(CONFIG, lambda t: "[1, 2]"), CONFIG, "expected a JSON object"),
    "config_lists_other_files": (_edit_config(lambda c: c["checkpoint"]["files"].pop(ROUTER)), CONFIG,
                                 "missing router.safetensors; unexpected none"),
    "zero_experts": (_edit_config(lambda c: c["checkpoint"].update(num_experts=0)), CONFIG, "num_experts is 0"),
    "no_layers": (_edit_config(lambda c: c["checkpoint"].update(layers=[])), CONFIG,
                  "expected a non-empty list of module names"),
    "bad_checksum_record": (_edit_config(lambda c: c["checkpoint"]["files"][ROUTER].update(sha256="not-hex")),
                            CONFIG, r"files\['router.safetensors'\] is .* expected \{size, sha256\}"),
    "unknown_format": (_edit_config(lambda c: c.update(format_version=9)), CONFIG, "format_version 9"),
    "wrong_shape": (_wrong_shape, "expert_2/adapter_model.safetensors", r"has shape \(3, 32\), expected \(4, 32\)"),
    "unexpected_tensor": (_extra_tensor, "expert_1/adapter_model.safetensors", "unexpected tensors"),
    "integer_tensor": (_integer_tensor, ROUTER, "expected a floating-point tensor"),
    "wrong_rank": (_wrong_rank, "expert_1/adapter_config.json",
                   "r=8, lora_alpha=8.0, but the model's expert 1 has r=4, lora_alpha=8.0"),
    "foreign_expert_folder": (lambda f: (f / "expert_3").mkdir(), "expert_3", "does not list"),
    "foreign_file_in_expert": (lambda f: (f / "expert_0" / "adapter_model.bin").write_bytes(b"x"),
                               "expert_0/adapter_model.bin", "does not list"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_checkpoint_leaves_the_model_unchanged_and_names_the_file(saved, case):
    damage, culprit, words = CORRUPTIONS[case]
    damage(saved)
    target = make_moe(seed=5)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=words) as error:
        ckpt.load_checkpoint(target, saved)
    assert culprit in str(error.value)
    assert_unchanged(target, before)
    with pytest.raises(CheckpointError, match=words):
        reload(saved)


def test_missing_files_are_file_not_found_errors(saved):
    (saved / "router.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(make_moe(), saved)
    assert issubclass(CheckpointFileMissing, CheckpointError)


def test_trainer_files_beside_the_checkpoint_are_ignored(saved):
    """A Trainer checkpoint-N holds optimizer/scheduler/RNG state and trainer_state.json beside our files."""
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"):
        (saved / name).write_bytes(b"not read")
    target = make_moe(seed=5)
    ckpt.load_checkpoint(target, saved)
    assert experts_equal(target, make_moe(seed=1))


def test_model_of_other_shape_is_refused_before_anything_changes(saved):
    for other in (
        DyLoRA_MoE(tiny_llama(), num_experts=2, lora_r=4, lora_alpha=8, kernel="eager"),
        DyLoRA_MoE(tiny_llama(), num_experts=3, lora_r=2, lora_alpha=4, kernel="eager"),
        DyLoRA_MoE(tiny_llama(), num_experts=3, lora_r=4, lora_alpha=16, kernel="eager"),
        DyLoRA_MoE(tiny_llama(), num_experts=3, lora_r=4, lora_alpha=8, kernel="eager", target_modules=["q_proj"]),
        DyLoRA_MoE(tiny_llama(hidden=64), num_experts=3, lora_r=4, lora_alpha=8, kernel="eager"),
    ):
        before = snapshot(other)
        with pytest.raises(CheckpointError, match=re.escape(str(saved))):
            ckpt.load_checkpoint(other, saved)
        assert_unchanged(other, before)


def test_format_1_checkpoint_still_loads(saved):
    """Checkpoints written before checksums: the same files, settings at the top level, no 'checkpoint' section."""

    def to_v1(config):
        config["format_version"] = 1
        del config["checkpoint"]

    _write_json(saved / "dylora_moe_config.json", to_v1)
    loaded = reload(saved)
    assert experts_equal(loaded, make_moe(seed=1))
    _truncate(saved / "expert_0" / "adapter_model.safetensors")  # no checksum: the parse still names the file
    target = make_moe(seed=5)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="expert_0/adapter_model.safetensors is not a readable safetensors"):
        ckpt.load_checkpoint(target, saved)
    assert_unchanged(target, before)


def test_no_pickle_is_ever_loaded(tmp_path, monkeypatch):
    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, _raise)
    moe = make_moe(seed=1)
    moe.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"a Trainer file: never read")
    assert experts_equal(reload(tmp_path / "ckpt"), moe)


def test_config_records_every_file_with_its_checksum(saved):
    config = json.loads((saved / "dylora_moe_config.json").read_text())
    files = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file())
    assert sorted(config["checkpoint"]["files"]) == [f for f in files if f != "dylora_moe_config.json"]
    import hashlib

    for name, record in config["checkpoint"]["files"].items():
        data = (saved / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert config["format_version"] == 2 and config["num_experts"] == 3 and config["lora_r"] == 4


# ----- per-expert ranks and the model's config object ------------------------------------------------------------


def _with_expert_ranks(moe, ranks, alphas):
    """The per-expert rank attributes of the layer (INTERFACES 2), with zero padding above each expert's rank."""
    with torch.no_grad():
        for layer in moe.handle.layers.values():
            layer.expert_ranks, layer.expert_alphas = list(ranks), list(alphas)
            for i, r in enumerate(ranks):
                layer.lora_A[i, r:] = 0
                layer.lora_B[i, :, r:] = 0
    return moe


def test_each_expert_saved_with_its_own_rank_and_loads_alone_in_peft(tmp_path):
    from peft import PeftModel

    # alpha / r is 2 for every expert, so this branch's layer (one shared scaling) computes the same outputs.
    moe = _with_expert_ranks(make_moe(seed=1), [4, 2, 1], [8.0, 4.0, 2.0])
    moe.save_pretrained(tmp_path / "ckpt")
    for i, (r, alpha) in enumerate([(4, 8.0), (2, 4.0), (1, 2.0)]):
        adapter = json.loads((tmp_path / "ckpt" / f"expert_{i}" / "adapter_config.json").read_text())
        assert (adapter["r"], adapter["lora_alpha"]) == (r, alpha)
        tensors = load_file(tmp_path / "ckpt" / f"expert_{i}" / "adapter_model.safetensors")
        assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {r}
        assert {t.shape[1] for k, t in tensors.items() if "lora_B" in k} == {r}
    input_ids = torch.randint(3, 100, (2, 5))
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ckpt" / "expert_1")).eval()
        moe.expert_manager.set_active_expert(1)
        torch.testing.assert_close(peft_model(input_ids).logits, moe.foundation_model(input_ids).logits)

    same = _with_expert_ranks(make_moe(seed=5), [4, 2, 1], [8.0, 4.0, 2.0])
    with torch.no_grad():  # garbage in the padding must be cleared by the load
        for layer in same.handle.layers.values():
            layer.lora_A.add_(1.0)
    ckpt.load_checkpoint(same, tmp_path / "ckpt")
    assert experts_equal(same, moe)

    uniform = make_moe(seed=5)
    before = snapshot(uniform)
    with pytest.raises(CheckpointError, match="expert_1/adapter_config.json: r=2, .* expert 1 has r=4"):
        ckpt.load_checkpoint(uniform, tmp_path / "ckpt")
    assert_unchanged(uniform, before)


def _grow(moe, experts):
    """Add experts of their own (r, alpha) to every layer and the router."""
    for r, alpha in experts:
        moe.expert_manager.create_expert(r=r, lora_alpha=alpha)
        moe.router.add_expert()
    return moe


def test_grown_experts_of_other_ranks_round_trip_and_load_alone_in_peft(tmp_path):
    from peft import PeftModel

    moe = _grow(make_moe(seed=1), [(8, 4.0), (2, 6.0)])  # a larger rank pads the others; a smaller one is padded
    with torch.no_grad():
        for layer in moe.handle.layers.values():
            layer.lora_B[3].normal_()
            layer.lora_B[4, :, :2].normal_()
    moe.save_pretrained(tmp_path / "ckpt")
    input_ids = torch.randint(3, 100, (2, 5))
    with torch.no_grad():
        for i, (r, alpha) in enumerate([(4, 8.0)] * 3 + [(8, 4.0), (2, 6.0)]):
            adapter = json.loads((tmp_path / "ckpt" / f"expert_{i}" / "adapter_config.json").read_text())
            assert (adapter["r"], adapter["lora_alpha"]) == (r, alpha)
            if i >= 2:
                peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ckpt" / f"expert_{i}")).eval()
                moe.expert_manager.set_active_expert(i)
                torch.testing.assert_close(peft_model(input_ids).logits, moe.foundation_model(input_ids).logits)
    target = _grow(make_moe(seed=7), [(8, 4.0), (2, 6.0)])
    ckpt.load_checkpoint(target, tmp_path / "ckpt")
    expected = moe.state_dict()
    for key, value in target.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_moe_config_object_is_written_as_the_settings(tmp_path, monkeypatch):
    """Where the model has ``moe_config`` (helper api's DyLoRAMoEConfig), its ``to_dict()`` is the settings."""
    if hasattr(DyLoRA_MoE, "moe_config"):  # the real one: a model rebuilt from the checkpoint has the same experts
        moe = make_moe(seed=1)
        moe.save_pretrained(tmp_path / "real")
        assert ckpt.checkpoint_settings(ckpt.read_config(tmp_path / "real")) == moe.moe_config.to_dict()
        assert experts_equal(reload(tmp_path / "real"), moe)

    class FakeConfig:
        def to_dict(self):
            return {"num_experts": 3, "lora_r": 4, "lora_alpha": 8, "kernel": "eager", "note": "from moe_config"}

    monkeypatch.setattr(DyLoRA_MoE, "moe_config", property(lambda self: FakeConfig()), raising=False)
    moe = make_moe(seed=1)
    moe.save_pretrained(tmp_path / "ckpt")
    config = ckpt.read_config(tmp_path / "ckpt")
    assert ckpt.checkpoint_settings(config) == FakeConfig().to_dict()
    target = make_moe(seed=5)
    ckpt.load_checkpoint(target, tmp_path / "ckpt")
    assert experts_equal(target, moe)


def test_checkpoint_modules_do_not_import_the_reference_path():
    """The production save path stays off the test-only reference path (its imports, followed in the package)."""
    import ast

    seen, todo = set(), ["checkpoint"]
    while todo:
        name = todo.pop()
        seen.add(name)
        tree_ = ast.parse((REPO / "dylora_moe" / "io" / f"{name}.py").read_text())
        for node in ast.walk(tree_):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                module = node.module.split(".")[0]
                if module not in seen and (REPO / "dylora_moe" / "io" / f"{module}.py").is_file():
                    todo.append(module)
    assert "reference" not in seen and {"checkpoint", "peft_format", "atomic_folder"} <= seen
