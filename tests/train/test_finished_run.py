"""Resuming a run that is complete says so in one line and does nothing else; more --max_steps trains on."""

import json
import logging

from dylora_moe.train import args as train_args
from dylora_moe.train import cli as train
from dylora_moe.train.runs import LOCK_FILE


def _finished_run(out, argv):
    fingerprint = train_args.model_fingerprint(train_args.parse_args(argv))
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"run_id": "run-a", "fingerprint": fingerprint}))
    checkpoint = out / "checkpoint-4"
    checkpoint.mkdir()
    identity = {"RunIdentity": {"args": {"run_id": "run-a", "fingerprint": fingerprint}}}
    state = {"global_step": 4, "max_steps": 4, "stateful_callbacks": identity}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    (out / "final").mkdir()
    (out / "summary.md").write_text("# summary\n")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 1.0, "run_id": "run-a"}) + "\n")
    return checkpoint


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_resuming_a_finished_run_says_so_and_does_nothing(tmp_path, caplog):
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--report_to", "none", "--max_steps", "4"]
    checkpoint = _finished_run(out, argv)
    before = _snapshot(out)
    with caplog.at_level(logging.INFO, logger="train"):
        result = train.main([*argv, "--resume_from_checkpoint"])
    after = _snapshot(out)
    assert after.pop(LOCK_FILE) and result["already_finished"] and after == before  # only the folder lock added
    assert [r.getMessage() for r in caplog.records] == [
        f"run run-a in {out} finished already at step 4 (final/ and summary.md are there); nothing to do: pass "
        "--max_steps above 4 to train further"
    ]
    assert not train.finished_at(str(checkpoint), 6)  # --max_steps 6: trains on from step 4


def test_disable_tqdm_is_read_in_each_form():
    assert train.asks_no_bars(["--disable_tqdm"]) and train.asks_no_bars(["--disable_tqdm", "true", "--x", "1"])
    assert train.asks_no_bars(["--disable_tqdm=True"]) and not train.asks_no_bars(["--disable_tqdm", "false"])
    assert not train.asks_no_bars(["--max_steps", "4"])
