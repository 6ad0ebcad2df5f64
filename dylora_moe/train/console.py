"""train.py's console: one progress bar per phase on a terminal, plain lines in a log file, metrics as one line.

Replaces the Trainer's ``ProgressCallback`` / ``PrinterCallback`` (nested bars that leave ``[A`` escapes in a
redirected log, and each log printed as a Python dict). On a TTY (and without ``--disable_tqdm``) training has one
bar and each evaluation one bar that is cleared when it ends; every log is one compact line written above the bar.
Otherwise there is no bar at all, only the lines.
"""

from __future__ import annotations

import logging
import math
import sys

from transformers import TrainerCallback

logger = logging.getLogger("train")

# Short names for the keys of a training log, in print order; the rest (util_expert_i, eval keys) are handled apart.
TRAIN_KEYS = (
    ("loss", "loss", ".4f"),
    ("lm_loss", "lm", ".4f"),
    ("balance_loss", "balance", ".4f"),
    ("router_entropy", "entropy", ".3f"),
    ("grad_norm", "grad", ".3g"),
    ("learning_rate", "lr", ".2e"),
    ("tokens_per_s", "tok/s", ",.0f"),
    ("peak_mem_mb", "mem MiB", ",.0f"),
)


def _value(value, spec: str) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _per_expert(logs: dict, marker: str) -> list[float]:
    """The values of the keys holding ``marker`` (``util_expert_``, ``balance_bias_expert_``) in expert order."""
    return [v for k, v in sorted(logs.items(), key=lambda kv: _expert_index(kv[0])) if marker in k]


def _balance_parts(logs: dict, utils: list[float]) -> list[str]:
    """Under loss-free balancing (a selection bias is logged, the balance loss is zero by construction): the
    largest expert's share of the load times E (1.00 = perfectly even, E = one expert takes everything) and the
    bias spread (max - min); under a balance loss: that loss."""
    biases = _per_expert(logs, "balance_bias_expert_")
    if not biases:
        return [f"balance {_value(logs['balance_loss'], '.4f')}"] if "balance_loss" in logs else []
    parts = [f"load max x E {max(utils) * len(utils):.2f}"] if utils else []
    if logs.get("balance_loss"):  # a balance loss on top of the bias
        parts.append(f"balance {_value(logs['balance_loss'], '.4f')}")
    return [*parts, f"bias spread {max(biases) - min(biases):.3f}"]


def format_log(logs: dict, step: int, max_steps: int) -> str | None:
    """One line for a Trainer log: a training step, one domain's evaluation, the specialisation of an evaluation,
    or the end-of-training summary; None for a log with nothing to show here (it is in metrics.jsonl)."""
    utils = _per_expert(logs, "util_expert_")
    util = ("util " + "/".join(f"{u:.2f}" for u in utils)) if utils else ""
    where = f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"
    losses = [k for k in logs if k.startswith("eval_") and k.endswith("_loss") and not k.endswith("balance_loss")]
    if losses:
        prefix = losses[0][: -len("loss")]
        parts = [f"eval {prefix[5:-1]}", where, f"loss {logs[losses[0]]:.4f}"]
        if prefix + "ppl" in logs:
            parts.append(f"ppl {logs[prefix + 'ppl']:.2f}")
        if prefix + "router_entropy" in logs:
            parts.append(f"entropy {logs[prefix + 'router_entropy']:.3f}")
        return " | ".join([*parts, util] if util else parts)
    if "train_runtime" in logs:
        parts = [f"train done at {where}", f"{logs['train_runtime']:.1f} s"]
        if "train_loss" in logs:
            parts.append(f"mean loss {logs['train_loss']:.4f}")
        return " | ".join(parts)
    if "eval_spec_nmi" in logs:
        line = f"eval specialisation | {where} | NMI domain-expert {logs['eval_spec_nmi']:.3f}"
        if "eval_spec_nmi_chance" in logs:
            line += f" (chance {logs['eval_spec_nmi_chance']:.3f})"
        return line
    if "loss" not in logs:
        return None
    parts = [where]
    for key, short, spec in TRAIN_KEYS:
        if key == "balance_loss":
            parts += _balance_parts(logs, utils)
        elif key in logs:
            parts.append(f"{short} {_value(logs[key], spec)}")
    return " | ".join([*parts, util] if util else parts)


def _expert_index(key: str) -> int:
    tail = key.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1


class Console(TrainerCallback):
    """Progress and metrics for people: a bar per phase on a TTY, one line per log everywhere."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.train_bar = self.eval_bar = None

    def _bars(self, args) -> bool:
        from dylora_moe import progress

        return not args.disable_tqdm and progress.enabled(self.stream)  # a terminal, or DYLORA_PROGRESS=1

    def _write(self, line: str) -> None:
        if self.train_bar is not None or self.eval_bar is not None:
            from tqdm.auto import tqdm

            tqdm.write(line, file=self.stream)
        else:
            logger.info(line)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self._bars(args):
            from tqdm.auto import tqdm

            self.train_bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", file=self.stream)

    def on_step_end(self, args, state, control, **kwargs):
        if self.train_bar is not None:
            self.train_bar.update(state.global_step - self.train_bar.n)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.eval_bar is None and state.is_world_process_zero and self._bars(args) and eval_dataloader is not None:
            from tqdm.auto import tqdm

            total = len(eval_dataloader) if hasattr(eval_dataloader, "__len__") else None
            position = 1 if self.train_bar is not None else 0
            self.eval_bar = tqdm(total=total, desc="eval", leave=False, position=position, file=self.stream)
        if self.eval_bar is not None:
            self.eval_bar.update(1)

    def _close_eval(self):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_eval()

    def on_predict(self, args, state, control, **kwargs):
        self._close_eval()

    def on_log(self, args, state, control, logs=None, **kwargs):
        line = format_log(logs, state.global_step, state.max_steps) if state.is_world_process_zero and logs else None
        if line is not None:
            self._write(line)

    def on_train_end(self, args, state, control, **kwargs):
        if self.train_bar is not None:
            self.train_bar.close()
            self.train_bar = None
