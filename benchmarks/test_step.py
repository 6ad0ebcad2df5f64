"""Model-level benchmarks: one step of ``DyLoRA_MoE`` per backend and routing, against a single-adapter peft LoRA.

Modes:
  - ``full``: one training step: zero_grad, forward with labels (LM loss + the balance loss), backward, AdamW
    step, in train mode (LoRA dropout on);
  - ``fwd``: one forward with labels under ``torch.no_grad`` in eval mode (an evaluation step).
Every configuration uses top_k = 1 and mature experts (sparse routing), LoRA on q/k/v/o_proj, alpha = 2r,
dropout 0.05, random ids with no padding. ``reference`` is the original algorithm (peft adapters; sequence routing =
one full pass per expert), the figure the "3x the original" goals (docs/design.md §5) are measured against;
``peft`` is ONE plain peft LoRA adapter on the same base, the ceiling a mixture of experts is compared with;
``base`` the frozen base model alone (no adapter: forward and the backward to the inputs, which every adapter's
step also pays; no optimizer), so the report states what the experts add to it ("adds to base").

Each test builds its base model from a config with a fixed seed (the same weights for every backend) and frees it
afterwards, so the GPU's peak memory (``peak_mem_bytes``: weights, optimizer state, activations) is this
configuration's alone. On the CPU the peak is the extra bytes allocated during one step (see conftest).

``<backend>+compile`` (E = 4, token routing): the same step with the model wrapped in ``torch.compile`` (what
``train.py --compile`` does); skipped with the error when compilation fails, and on the CPU unless
BENCH_COMPILE=1. ``triton+cudagraphs`` (CUDA only): the training step (forward, backward, optimizer step) compiled
with ``mode="reduce-overhead"``, so it replays as CUDA graphs, beside the eager-mode launches of ``triton``.
``test_router_kernel_time`` (GPU only) times the Triton router at this step's token count, with
its CUDA-graph time beside the host-inclusive one.

Rows: op ``step`` (provider = backend) and ``router``; x axis ``E`` (experts; peft is E = 1); shape = the model
shape plus E and routing.
"""

from __future__ import annotations

import gc
import os
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


# GPU: a Llama-like base of realistic width (4 x 1024 tokens, bf16). CPU: the original's measured size (4 layers, hidden
# 128, batch 4 x 128, r = 8), where the original algorithm took ~140 ms per step at E = 4.
SHAPE = StepShape(2048, 4, 16, 32000, 4, 1024, 16) if HAS_CUDA else StepShape(128, 4, 4, 512, 4, 128, 8)
BACKENDS = ["triton", "eager", "reference"]
# BENCH_QUICK=1 (run_gpu.sh quick): one training step per backend, E = 4, token routing.
QUICK = os.environ.get("BENCH_QUICK") == "1"
ROUTINGS = ["token"] if QUICK else ["sequence", "token"]
# E = 4 first (and peft before all): the goals need them if a time limit cuts the run.
EXPERTS = [4] if QUICK else [4, 2, 8]
MODES = ["full"] if QUICK else ["full", "fwd"]
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


def shape_of(experts: int, routing: str) -> dict:
    return dict(
        hidden=SHAPE.hidden,
        layers=SHAPE.layers,
        vocab=SHAPE.vocab,
        batch=SHAPE.batch,
        seq=SHAPE.seq,
        r=SHAPE.rank,
        top_k=TOP_K,
        dropout=DROPOUT,
        E=experts,
        routing=routing,
    )


def bench_step(bench, fn, provider: str, mode: str, experts: int, routing: str) -> None:
    bench(
        fn,
        op="step",
        provider=provider,
        mode=mode,
        x=("E", experts),
        shape=shape_of(experts, routing),
        rounds=STEP_ROUNDS,
        warmup_rounds=STEP_WARMUP,
        tokens=SHAPE.batch * SHAPE.seq,
    )


def build_moe(backend: str, routing: str, experts: int):
    from dylora_moe import DyLoRA_MoE

    return DyLoRA_MoE(
        build_base(),
        num_experts=experts,
        lora_r=SHAPE.rank,
        lora_alpha=2 * SHAPE.rank,
        lora_dropout=DROPOUT,
        backend=backend,
        routing=routing,
        top_k=TOP_K,
        target_modules=TARGETS,
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
    bench_step(bench, fn, "peft", mode, experts=1, routing="-")


@pytest.mark.parametrize("mode", MODES)
def test_step_base(bench, mode):
    """The frozen base model: the floor every adapter's step adds to (input embeddings require grad, so the
    backward runs through every layer to the inputs, as it does under LoRA)."""
    bench.benchmark.group = f"step {mode} base"
    model = build_base()
    model.requires_grad_(False)
    model.enable_input_require_grads()
    inputs = batch()
    if mode == "fwd":
        model.eval()

        def fn():
            with torch.no_grad():
                return model(**inputs).loss
    else:
        model.train()

        def fn():
            model(**inputs).loss.backward()

    bench_step(bench, fn, "base", mode, experts=0, routing="-")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("experts", EXPERTS, ids=lambda e: f"E{e}")
def test_step_moe(bench, experts, routing, backend, mode):
    if backend == "triton" and not HAS_CUDA:
        pytest.skip("backend triton is timed on a CUDA GPU only (the CPU interpreter is not a speed path)")
    bench.benchmark.group = f"step {mode} E={experts} {routing}"
    model = build_moe(backend, routing, experts)
    fn = step_fn(model, model.trainable_parameters(), mode)
    bench_step(bench, fn, backend, mode, experts, routing)


@pytest.mark.skipif(not HAS_CUDA, reason="router kernel time is measured with CUDA graphs, on a CUDA GPU only")
@pytest.mark.parametrize("experts", [4, 8])
def test_router_kernel_time(bench, experts):
    """The Triton router at this step's token count: host-inclusive time and CUDA-graph (kernel-only) time."""
    from dylora_moe.kernels import topk_route

    tokens = SHAPE.batch * SHAPE.seq
    bench.benchmark.group = f"router T{tokens}-E{experts}-k{TOP_K} fwd"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(tokens, experts, generator=gen, device=DEVICE).to(DTYPE)
    bench(
        lambda: topk_route(logits, TOP_K, backend="triton", check_finite=False),
        op="router",
        provider="triton",
        mode="fwd",
        x=("case", f"T{tokens}-E{experts}-k{TOP_K}"),
        shape={"T": tokens, "E": experts, "k": TOP_K},
        rounds=30,
        warmup_rounds=5,
        kernel_clock=True,
        cudagraph=True,
    )


@pytest.mark.parametrize("mode", MODES)
def test_step_compiled(bench, mode):
    """E = 4, token routing, the fast backend of this device, with the model under ``torch.compile``."""
    if not HAS_CUDA and os.environ.get("BENCH_COMPILE") != "1":
        pytest.skip(
            "compiling the CPU model takes minutes (5 min on a loaded 2-core machine); BENCH_COMPILE=1 times it"
        )
    backend = "triton" if HAS_CUDA else "eager"
    bench.benchmark.group = f"step {mode} E=4 token"
    model = build_moe(backend, "token", 4)
    fn = step_fn(torch.compile(model), model.trainable_parameters(), mode)
    try:
        fn()  # compiles here: a failure is a skip with its reason, not a benchmark error
    except Exception as error:  # dynamo/inductor raise many error types
        pytest.skip(f"torch.compile of the {backend} model failed: {type(error).__name__}: {error}"[:400])
    bench_step(bench, fn, f"{backend}+compile", mode, 4, "token")


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs (torch.compile mode='reduce-overhead') need a CUDA GPU")
def test_step_cudagraphs(bench):
    """E = 4, token routing, Triton: the whole training step under ``torch.compile(mode="reduce-overhead")``."""
    bench.benchmark.group = "step full E=4 token"
    model = build_moe("triton", "token", 4)
    model.train()
    inputs = batch()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    @torch.compile(mode="reduce-overhead")
    def train():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()

    try:
        for _ in range(3):  # the first calls compile and record the graphs
            train()
    except Exception as error:  # dynamo/inductor/cudagraph trees raise many error types
        pytest.skip(
            f"torch.compile(mode='reduce-overhead') of the triton step failed: {type(error).__name__}: {error}"[:400]
        )
    bench_step(bench, train, "triton+cudagraphs", "full", 4, "token")
