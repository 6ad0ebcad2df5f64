"""Model-level benchmarks: one step of ``DyLoRA_MoE`` per backend and routing, against a single-adapter peft LoRA.

Modes:
  - ``train``: zero_grad, forward with labels (LM loss + the balance loss), backward, AdamW step, in train mode
    (LoRA dropout on);
  - ``fwd``: one forward with labels under ``torch.no_grad`` in eval mode (an evaluation step).
Every configuration uses top_k = 1 and mature experts (sparse routing), LoRA on q/k/v/o_proj, alpha = 2r,
dropout 0.05, random ids with no padding. ``reference`` is the original algorithm (peft adapters; sequence routing =
one full pass per expert), the figure DESIGN 4's "3x the original" goals are measured against; ``peft`` is ONE
plain peft LoRA adapter on the same base, the ceiling a mixture of experts is compared with.

Each test builds its base model from a config with a fixed seed (the same weights for every backend) and frees it
afterwards, so the GPU's peak memory (``peak_mem_bytes``: weights, optimizer state, activations) is this
configuration's alone. On the CPU the peak is the extra bytes allocated during one step (see conftest).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.conftest import DEVICE, DTYPE, HAS_CUDA


@dataclass(frozen=True)
class StepShape:
    hidden: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq: int
    rank: int

    def __str__(self) -> str:
        return f"h{self.hidden}-L{self.layers}-V{self.vocab}-B{self.batch}x{self.seq}-r{self.rank}"

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.hidden * 11 // 4,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.seq,
        )


# GPU: a Llama-like base of realistic width (4 x 1024 tokens, bf16). CPU: DESIGN 2's measurement (4 layers, hidden
# 128, batch 4 x 128, r = 8), where the original algorithm took ~140 ms per step at E = 4.
SHAPE = StepShape(2048, 4, 16, 32000, 4, 1024, 16) if HAS_CUDA else StepShape(128, 4, 4, 512, 4, 128, 8)
BACKENDS = ["triton", "eager", "reference"]
ROUTINGS = ["sequence", "token"]
EXPERTS = [4, 2, 8]  # E = 4 first (and peft before all): the goals need them if a time limit cuts the run
MODES = ["train", "fwd"]
STEP_ROUNDS, STEP_WARMUP = (5, 2) if HAS_CUDA else (7, 1)
TOP_K = 1
DROPOUT = 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_base() -> LlamaForCausalLM:
    """Random-weight Llama on the benchmark device; seeded, so every test gets the same base."""
    gc.collect()
    if HAS_CUDA:
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(SHAPE.llama_config())
    return model.to(DTYPE)


def batch() -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, SHAPE.vocab, (SHAPE.batch, SHAPE.seq), generator=gen).to(DEVICE)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def step_fn(model, params, mode: str):
    """The benchmarked callable for ``mode`` (see the module docstring)."""
    inputs = batch()
    if mode == "fwd":
        model.eval()

        def forward():
            with torch.no_grad():
                return model(**inputs).loss

        return forward
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def train():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()

    return train


def info(mode: str, backend: str, **extra) -> dict:
    return dict(
        kind="step",
        mode=mode,
        backend=backend,
        shape=str(SHAPE),
        tokens=SHAPE.batch * SHAPE.seq,
        hidden=SHAPE.hidden,
        layers=SHAPE.layers,
        vocab=SHAPE.vocab,
        batch=SHAPE.batch,
        seq=SHAPE.seq,
        r=SHAPE.rank,
        top_k=TOP_K,
        **extra,
    )


@pytest.mark.parametrize("mode", MODES)
def test_step_peft(bench, mode):
    from peft import LoraConfig, get_peft_model

    bench.benchmark.group = f"step {mode} peft"
    config = LoraConfig(
        r=SHAPE.rank, lora_alpha=2 * SHAPE.rank, lora_dropout=DROPOUT, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    model = get_peft_model(build_base(), config)
    fn = step_fn(model, [p for p in model.parameters() if p.requires_grad], mode)
    bench(fn, rounds=STEP_ROUNDS, warmup_rounds=STEP_WARMUP, **info(mode, "peft", routing="-", E=1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("experts", EXPERTS, ids=lambda e: f"E{e}")
def test_step_moe(bench, experts, routing, backend, mode):
    if backend == "triton" and not HAS_CUDA:
        pytest.skip("backend triton is timed on a CUDA GPU only (the CPU interpreter is not a speed path)")
    from dylora_moe import DyLoRA_MoE

    bench.benchmark.group = f"step {mode} E={experts} {routing}"
    model = DyLoRA_MoE(
        build_base(),
        num_experts=experts,
        lora_r=SHAPE.rank,
        lora_alpha=2 * SHAPE.rank,
        lora_dropout=DROPOUT,
        kernel=backend,
        routing=routing,
        top_k=TOP_K,
        target_modules=TARGETS,
    )
    fn = step_fn(model, model.trainable_parameters(), mode)
    bench(fn, rounds=STEP_ROUNDS, warmup_rounds=STEP_WARMUP, **info(mode, backend, routing=routing, E=experts))
