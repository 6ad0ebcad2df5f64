"""Functional evaluation: do the completions of a model pass the benchmark tests? pass@k on MBPP and HumanEval.

- :mod:`.problems`: the benchmarks, in the bigcode evaluation harness's prompt format, with its stop sequences.
- :mod:`.generation`: batched completions with the KV cache under a routing (base, learned, one expert forced).
- :mod:`.execution`: the sandbox every program runs in (kernel isolation, limits, audit hook: docs/sandbox.md).
- :mod:`.passk`: the unbiased pass@k estimator of Chen et al. (2021).
- :mod:`.evaluation`: the runs (:func:`evaluate_model`, :func:`evaluate_after_training`, :func:`score_samples`).
- :mod:`.report`: samples JSONL, metrics JSON, the markdown section and the figure.
- :mod:`.loading`: a checkpoint on its base model, or a base model alone. ``python -m dylora_moe.evaluate``: the CLI.

Torch and transformers are imported only by generation and loading: scoring a samples file needs neither.
"""

from .evaluation import evaluate_after_training, evaluate_model, score, score_samples, summarise
from .execution import Limits, Outcome, run_program, run_programs
from .passk import mean_pass_at_k, pass_at_k
from .problems import BENCHMARKS, Problem, load_problems

__all__ = [
    "BENCHMARKS",
    "Limits",
    "Outcome",
    "Problem",
    "evaluate_after_training",
    "evaluate_model",
    "load_problems",
    "mean_pass_at_k",
    "pass_at_k",
    "run_program",
    "run_programs",
    "score",
    "score_samples",
    "summarise",
]
