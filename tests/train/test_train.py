"""train.py end to end on the tiny model: metrics, report, reload, resume, two processes, bad input.

Runs use a 1-layer tiny Llama (hidden 32, vocab 300), 64-token rows, 2 experts and a few optimizer steps, on one
thread (2-core CI: OpenMP threads of tiny matmuls only contend). Costs are listed by ``pytest --durations``.
"""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_support import DATA_DIR, TINY

from dylora_moe.base_models import ModelLoadError
from dylora_moe.corpora import DataError
from dylora_moe.train import cli as train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _train_logs(output_dir: Path) -> dict[int, dict]:
    """Last training log per step (a resumed run logs some steps twice)."""
    return {r["step"]: r for r in _records(output_dir) if "lm_loss" in r}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """4 steps, evaluation + checkpoint every 2, never interrupted."""
    out = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the per-test thread fixture
    try:
        args = [*TINY, "--kernel", "eager", "--max_steps", "4", "--eval_steps", "2", "--output_dir", str(out)]
        result = train.main(args)
    finally:
        torch.set_num_threads(threads)
    return out, result


@pytest.mark.slow
def test_end_to_end_metrics_report_and_reload(straight_run):
    out, result = straight_run
    initial, final = result["initial"], result["final"]
    for domain in ("code_alpaca", "mbpp"):
        assert final[f"eval_{domain}_loss"] < initial[f"eval_{domain}_loss"], domain
        assert math.isclose(final[f"eval_{domain}_ppl"], math.exp(final[f"eval_{domain}_loss"]), rel_tol=1e-9)
        shares = [final[f"eval_{domain}_util_expert_{e}"] for e in range(2)]
        assert math.isclose(sum(shares), 1.0, rel_tol=1e-6)

    logs = _train_logs(out)
    assert sorted(logs) == [1, 2, 3, 4]
    for r in logs.values():
        for key in ("loss", "lm_loss", "balance_loss", "router_entropy", "tokens_per_s", "peak_mem_mb"):
            assert math.isfinite(r[key]) and r[key] >= 0, key
        assert math.isclose(r["util_expert_0"] + r["util_expert_1"], 1.0, rel_tol=1e-6)
        # loss = LM loss + 0.01 * balance loss (no z-loss): the logged parts add up to the optimised loss
        assert math.isclose(r["loss"], r["lm_loss"] + 0.01 * r["balance_loss"], rel_tol=1e-5)
    assert logs[4]["lm_loss"] < logs[1]["lm_loss"]

    summary = (out / "summary.md").read_text()
    assert f"| code_alpaca | {initial['eval_code_alpaca_loss']:.4f} | {final['eval_code_alpaca_loss']:.4f} |" in summary
    assert summary.count("| domain | expert 0 | expert 1 | effective experts | router entropy (nats/token) |") == 1
    for plot in ("loss.png", "utilization.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in out.iterdir()} >= {"checkpoint-2", "checkpoint-4", "final", "metrics.jsonl"}

    # The saved model alone (peft-format experts + router on the cached tiny base) gives the same eval loss.
    from transformers import AutoModelForCausalLM

    from dylora_moe.model import DyLoRA_MoE

    trainer = result["trainer"]
    base = AutoModelForCausalLM.from_pretrained(next(out.glob("tiny-*")))
    reloaded = DyLoRA_MoE.from_pretrained(base, out / "final").eval()
    dataset = trainer.eval_dataset["code_alpaca"]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), 4):  # the eval loss: the mean over all labelled tokens of the set
            batch = [dataset[i] for i in range(start, min(start + 4, len(dataset)))]
            inputs = {k: torch.stack([b[k] for b in batch]) for k in ("input_ids", "attention_mask", "labels")}
            scored = int((inputs["labels"][:, 1:] != -100).sum())
            total += float(reloaded(**inputs).loss) * scored
            tokens += scored
    assert math.isclose(total / tokens, final["eval_code_alpaca_loss"], rel_tol=1e-5)


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_after_interrupted_save_matches_straight_run(straight_run, tmp_path, monkeypatch):
    from dylora_moe.train.trainer import MoETrainer

    out = tmp_path / "resumed"
    args = [*TINY, "--kernel", "eager", "--max_steps", "4", "--eval_steps", "2", "--output_dir", str(out)]
    stock = MoETrainer._save_optimizer_and_scheduler

    def die_in_second_save(self, output_dir):
        if self.state.global_step == 4:  # the experts of checkpoint 4 are written, the rest is not
            raise _Interrupt
        stock(self, output_dir)

    monkeypatch.setattr(MoETrainer, "_save_optimizer_and_scheduler", die_in_second_save)
    with pytest.raises(_Interrupt):
        train.main(args)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-4").exists()
    assert not (out / ".staging-checkpoint-4").exists()  # a failed save removes its staging folder (a kill leaves it)

    monkeypatch.setattr(MoETrainer, "_save_optimizer_and_scheduler", stock)
    train.main([*args, "--resume_from_checkpoint"])  # the last COMPLETE checkpoint: 2
    straight, resumed = _train_logs(straight_run[0]), _train_logs(out)
    for step in (3, 4):
        for key in ("loss", "lm_loss", "balance_loss", "util_expert_0"):
            assert math.isclose(resumed[step][key], straight[step][key], rel_tol=1e-6, abs_tol=1e-9), (step, key)
    for name in ("expert_0", "expert_1"):
        a = load_file(straight_run[0] / "checkpoint-4" / name / "adapter_model.safetensors")
        b = load_file(out / "checkpoint-4" / name / "adapter_model.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)


def test_rotation_and_resume_leave_other_runs_and_user_files_alone(straight_run, tmp_path):
    """Issue 24: a bare resume with --save_total_limit 1 into a folder that also holds another run's checkpoint (with
    the user's notes) and a checkpoint of the run where the user added a file: both stay byte for byte; of the run's
    other checkpoints only the best is left. Every checkpoint train.py writes lists its files (checked on resume)."""
    from dylora_moe.train.runs import checkpoint_problem, checkpoints, foreign_files

    out = tmp_path / "out"
    shutil.copytree(straight_run[0], out)
    for _, path in checkpoints(out):
        assert checkpoint_problem(path) is None and foreign_files(path) == [], path
    foreign = out / "checkpoint-1"
    shutil.copytree(out / "checkpoint-2", foreign)
    state = json.loads((foreign / "trainer_state.json").read_text())
    state["stateful_callbacks"]["RunIdentity"]["args"]["run_id"] = "another-run"
    (foreign / "trainer_state.json").write_text(json.dumps(state))
    (foreign / "NOTES").write_text("another run's notes")
    (out / "checkpoint-2" / "NOTES").write_text("the user's notes")
    kept = {name: _tree(out / name) for name in ("checkpoint-1", "checkpoint-2")}
    args = [*TINY, "--kernel", "eager", "--max_steps", "8", "--eval_steps", "2", "--save_total_limit", "1"]
    result = train.main([*args, "--output_dir", str(out), "--resume_from_checkpoint"])
    assert {name: _tree(out / name) for name in kept} == kept
    best = Path(result["trainer"].state.best_model_checkpoint)
    assert {p.name for _, p in checkpoints(out)} == {"checkpoint-1", "checkpoint-2", best.name}
    assert checkpoint_problem(best) is None


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(REPO / "train.py"), *TINY, "--kernel", "eager", "--max_steps", "2", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = _train_logs(out)
    assert sorted(logs) == [1, 2]
    # Routing statistics are summed over both processes: 2 processes x 4 rows x 64 tokens per step at most.
    assert "- processes: 2" in (out / "summary.md").read_text()
    assert math.isclose(logs[2]["util_expert_0"] + logs[2]["util_expert_1"], 1.0, rel_tol=1e-6)
    assert (out / "checkpoint-2" / "rng_state_1.pth").is_file()  # one RNG file per process


@pytest.mark.slow
def test_sequence_routing_runs(tmp_path):
    # The seed's per-sequence mixture with each sequence's best expert only: routing pass + one batched pass; the
    # training loss in row chunks (--fused_loss auto), the evaluation with the full logits.
    out = tmp_path / "sequence"
    args = [*TINY, "--kernel", "eager", "--routing", "sequence", "--sequence_top_k", "1", "--max_steps", "2"]
    result = train.main([*args, "--fused_loss", "auto", "--output_dir", str(out)])
    assert result["trainer"].model.fused_loss == "auto"
    logs = _train_logs(out)
    assert sorted(logs) == [1, 2]
    assert math.isclose(logs[2]["util_expert_0"] + logs[2]["util_expert_1"], 1.0, rel_tol=1e-6)
    assert "routing=sequence" in (out / "summary.md").read_text()
    assert result["final"]["eval_code_alpaca_loss"] < result["initial"]["eval_code_alpaca_loss"]


@pytest.mark.slow
def test_triton_kernel_under_interpreter(tmp_path):
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    small = [a if a != "5" else "1" for a in TINY]  # eval_subset 1%
    out = tmp_path / "triton"
    result = train.main([*small, "--kernel", "triton", "--max_steps", "2", "--output_dir", str(out)])
    assert sorted(_train_logs(out)) == [1, 2]
    assert math.isfinite(result["final"]["eval_code_alpaca_loss"])


# ----- bad input ------------------------------------------------------------------------------------------------


def test_help_lists_every_original_flag():
    text = train.build_parser().format_help()
    for flag in (
        "--num_epochs", "--fp16", "--bf16", "--resume_from_checkpoint", "--training_subset", "--eval_subset",
        "--model_name", "--num_experts", "--lora_r", "--lora_alpha", "--lora_dropout", "--kernel", "--routing",
        "--top_k", "--temperature", "--data_dir", "--output_dir", "--seed", "--max_length", "--batch_size",
        "--gradient_accumulation_steps", "--learning_rate", "--max_steps", "--report_to",
    ):  # fmt: skip
        assert flag in text, flag
    original = train.parse_args(["--model_name", "google/codegemma-2b"])
    assert (original.num_train_epochs, original.learning_rate, original.per_device_train_batch_size) == (10, 2e-5, 4)
    assert (original.gradient_accumulation_steps, original.max_length) == (8, 512)
    assert (original.num_experts, original.lora_r, original.lora_alpha, original.lora_dropout) == (4, 16, 32, 0.05)


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=r"nowhere does not exist; expected a folder with code_alpaca_2k.json"):
        train.main([*TINY, "--data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")])


def test_malformed_json_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(DATA_DIR / "code_alpaca_2k.json", data)
    lines = (DATA_DIR / "mbpp.jsonl").read_text().splitlines()
    lines[9] = lines[9][:40]
    (data / "mbpp.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"mbpp.jsonl line 10: invalid JSON"):
        train.main([*TINY, "--data_dir", str(data), "--output_dir", str(tmp_path / "out")])


def test_unknown_model_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"cannot reach the Hugging Face hub.*--model_name /path/to/model"):
        train.main([*TINY, "--model_name", "no-such-org/no-such-model", "--output_dir", str(tmp_path / "out")])


def test_triton_without_gpu_fails_at_startup(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --kernel triton is valid")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--kernel", "triton"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--kernel triton" in err and "need a CUDA GPU" in err and "backend='eager'" in err


def test_other_bad_flags(capsys):
    for argv, message in (
        (["--top_k", "3", "--num_experts", "2"], "argument --top_k: expected an integer in [1, --num_experts=2]"),
        (["--fp16", "--bf16"], "exclude each other"),
    ):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert message in capsys.readouterr().err


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint-N folder"):
        train.main([*TINY, "--max_steps", "1", "--resume_from_checkpoint", "--output_dir", str(tmp_path)])


def test_no_trainable_lora_is_an_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    from dylora_moe.model import DyLoRA_MoE

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = DyLoRA_MoE(LlamaForCausalLM(config), 2, 4, 8, 0.0, kernel="eager")
    assert "2 experts x 1,024" in train.parameter_breakdown(model)  # q,k,v,o: 4 x (4*32 + 32*4) per expert
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)
    with pytest.raises(RuntimeError, match="no trainable LoRA parameter"):
        train.parameter_breakdown(model)


def test_cli_reports_data_error_cleanly(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "train.py"), "--data_dir", str(tmp_path / "nowhere")]
    cmd += ["--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data directory")
    assert "Traceback" not in proc.stderr


def test_report_to_auto_picks_wandb_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc wandb login
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    if importlib.util.find_spec("wandb") is None:
        assert train.resolve_report_to("auto", str(tmp_path)) == []
        return
    assert train.resolve_report_to("auto", str(tmp_path)) == ["wandb"]
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # an explicit mode is respected
    assert train.resolve_report_to("auto", str(tmp_path)) == ["wandb"] and os.environ["WANDB_MODE"] == "disabled"
    assert train.resolve_report_to("none", str(tmp_path)) == []
    assert train.resolve_report_to("wandb,tensorboard", str(tmp_path)) == ["wandb", "tensorboard"]


@pytest.mark.slow
def test_compile_flag_on_the_cpu(tmp_path):
    # --compile is TrainingArguments' torch_compile; on the CPU the eager backend checks the capture without a compiler.
    small = [a if a != "5" else "1" for a in TINY]  # eval_subset 1%
    args = [*small, "--kernel", "eager", "--max_steps", "1", "--compile", "--torch_compile_backend", "eager"]
    result = train.main([*args, "--output_dir", str(tmp_path / "compiled")])
    trainer = result["trainer"]
    assert trainer.args.torch_compile and trainer.args.torch_compile_backend == "eager"
    assert sorted(_train_logs(tmp_path / "compiled")) == [1]
    assert math.isfinite(result["final"]["eval_code_alpaca_loss"])


def test_run_outputs_list_every_file_a_run_writes(straight_run):
    """runs.RUN_OUTPUTS is the one list of a run's outputs (--overwrite_output_dir removes exactly these): every
    top-level entry of a finished run is in it, a checkpoint, or the tiny base model's cache."""
    from dylora_moe.train.runs import CHECKPOINT, LOCK_FILE, RUN_OUTPUTS

    out = straight_run[0]
    written = {p.name for p in out.iterdir()}
    listed = (*RUN_OUTPUTS, LOCK_FILE)  # the lock file is never removed (another run may be waiting on it)
    unlisted = {n for n in written if n not in listed and not CHECKPOINT.match(n) and not n.startswith("tiny-")}
    assert not unlisted, unlisted
    assert {"specialisation.png", "routing_examples.png", "routing_examples.html"} <= written


@pytest.mark.slow
def test_loss_free_with_gradient_accumulation(tmp_path):
    """--balance_loss loss_free over 2 micro-batches per step: the bias moves once per optimizer step (|b| = 0.1 per
    step at most, opposite for 2 experts), is logged per expert, and is kept in the checkpoint; the summary shows the
    load up front."""
    out = tmp_path / "loss-free"
    args = [*TINY, "--kernel", "eager", "--balance_loss", "loss_free", "--balance_update_rate", "0.1"]
    train.main([*args, "--gradient_accumulation_steps", "2", "--max_steps", "2", "--output_dir", str(out)])
    logs = _train_logs(out)
    biases = [(logs[s]["balance_bias_expert_0"], logs[s]["balance_bias_expert_1"]) for s in (1, 2)]
    assert abs(biases[0][0]) == pytest.approx(0.1) and biases[0][1] == pytest.approx(-biases[0][0])
    assert abs(biases[1][0]) in (pytest.approx(0.0), pytest.approx(0.2))
    assert biases[1][1] == pytest.approx(-biases[1][0])
    assert logs[2]["balance_loss"] == 0 and logs[2]["loss"] == pytest.approx(logs[2]["lm_loss"], rel=1e-5)
    saved = load_file(out / "checkpoint-2" / "router.safetensors")["selection_bias"]
    assert saved.tolist() == pytest.approx(list(biases[1]))
    summary = (out / "summary.md").read_text()
    assert "## Load balance (final model, evaluation tokens)" in summary
    assert "**Largest expert share x E over all evaluation tokens: " in summary
