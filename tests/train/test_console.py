"""train.py's console (dylora_moe.train.console): one compact line per log, no progress bar when not on a terminal."""

import io
import logging

from transformers import TrainerControl, TrainerState, TrainingArguments

from dylora_moe.train.console import Console, format_log


def test_training_evaluation_and_summary_lines():
    train = {"loss": 5.68771, "lm_loss": 5.6872, "balance_loss": 0.0475, "router_entropy": 0.3111, "grad_norm": 0.0812}
    train |= {"learning_rate": 2e-3, "tokens_per_s": 5238.4, "peak_mem_mb": 721.2}
    train |= {"util_expert_1": 0.4, "util_expert_0": 0.6, "util_expert_10": 0.0}
    assert format_log(train, 2, 4) == (
        "step 2/4 | loss 5.6877 | lm 5.6872 | balance 0.0475 | entropy 0.311 | grad 0.0812 | lr 2.00e-03 | "
        "tok/s 5,238 | mem MiB 721 | util 0.60/0.40/0.00"
    )
    evaluation = {"eval_mbpp_loss": 5.7126, "eval_mbpp_balance_loss": 0.04, "eval_mbpp_ppl": 302.66}
    evaluation |= {"eval_mbpp_router_entropy": 0.313, "eval_mbpp_util_expert_0": 0.6, "eval_mbpp_util_expert_1": 0.4}
    assert (
        format_log(evaluation, 2, -1)
        == "eval mbpp | step 2 | loss 5.7126 | ppl 302.66 | entropy 0.313 | util 0.60/0.40"
    )
    assert format_log({"train_runtime": 18.71, "train_loss": 5.69781}, 2, 2) == (
        "train done at step 2/2 | 18.7 s | mean loss 5.6978"
    )


def test_no_bar_when_not_a_terminal(tmp_path, caplog):
    stream = io.StringIO()  # not a TTY, as a log file
    console = Console(stream)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    state.max_steps, state.global_step = 4, 1
    with caplog.at_level(logging.INFO, logger="train"):
        console.on_train_begin(args, state, control)
        console.on_prediction_step(args, state, control, eval_dataloader=[1, 2])
        console.on_log(args, state, control, logs={"loss": 1.25})
        console.on_train_end(args, state, control)
    assert console.train_bar is None and console.eval_bar is None and stream.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == ["step 1/4 | loss 1.2500"]


def test_loss_free_step_line_shows_load_and_bias_instead_of_a_zero_loss():
    logs = {"loss": 5.0, "lm_loss": 5.0, "balance_loss": 0.0, "util_expert_0": 0.6, "util_expert_1": 0.4}
    logs |= {"balance_bias_expert_0": -0.05, "balance_bias_expert_1": 0.1}
    line = format_log(logs, 3, 4)
    assert line == "step 3/4 | loss 5.0000 | lm 5.0000 | load max x E 1.20 | bias spread 0.150 | util 0.60/0.40"
    assert "balance 0.0000" not in line


def test_no_lone_step_line_after_an_evaluation(tmp_path, caplog):
    """The specialisation metrics logged after each evaluation get their own line; a log with nothing for the
    console (the code-eval metrics) gets none, never a bare ``step N/M``."""
    spec = {"eval_spec_nmi": 0.0123, "eval_spec_mi": 0.01, "eval_spec_nmi_chance": 0.004, "epoch": 1.0}
    assert format_log(spec, 4, 4) == "eval specialisation | step 4/4 | NMI domain-expert 0.012 (chance 0.004)"
    assert format_log({"code_eval/mbpp/learned/pass@1": 0.0, "epoch": 1.0}, 4, 4) is None
    console = Console(io.StringIO())
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    state.max_steps, state.global_step = 4, 4
    with caplog.at_level(logging.INFO, logger="train"):
        console.on_log(args, state, control, logs={"code_eval/mbpp/learned/pass@1": 0.0, "epoch": 1.0})
        console.on_log(args, state, control, logs=spec)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["eval specialisation | step 4/4 | NMI domain-expert 0.012 (chance 0.004)"]
