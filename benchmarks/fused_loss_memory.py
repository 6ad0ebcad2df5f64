"""Peak memory and time of one DyLoRA_MoE training step, plain loss vs the chunked (fused) linear + cross-entropy.

    python -m benchmarks.fused_loss_memory [--vocab 32000] [--hidden 256] [--rows 4] [--length 512]

A small random Llama with a large vocabulary (the head's share of memory is what the fused loss removes). Peak
memory: on CUDA ``max_memory_allocated`` above what was live before the step; on the CPU the profiler's allocator
events (benchmarks/conftest.py: peak_memory). Prints one Markdown table row per (routing, loss).
"""

from __future__ import annotations

import argparse
import statistics
import time

import benchmarks.quiet  # noqa: F401  (before torch: the profiler's and c10's loggers read the environment)

# isort: split
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.conftest import DEVICE, peak_memory, sync
from dylora_moe import DyLoRA_MoE


def build(args, routing: str) -> DyLoRA_MoE:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.length,
    )  # fmt: skip
    kw = {"sequence_top_k": 1} if routing == "sequence" else {}
    base = LlamaForCausalLM(config).to(DEVICE)
    return DyLoRA_MoE(
        base, num_experts=4, lora_r=8, lora_alpha=16, lora_dropout=0.0, backend="auto", routing=routing, top_k=2, **kw
    ).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, args.vocab, (args.rows, args.length), generator=gen).to(DEVICE)
    mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    logits_bytes = args.rows * args.length * args.vocab * 4
    print(f"device {DEVICE}, torch {torch.__version__}, B x S x V = {args.rows} x {args.length} x {args.vocab} "
          f"(fp32 logits {logits_bytes / 2**20:.0f} MiB), hidden {args.hidden}")  # fmt: skip
    print("| routing | loss | peak extra memory (MiB) | step time (s, median) |")
    print("|---|---|---|---|")
    for routing in ("token", "sequence"):
        moe = build(args, routing)
        for fused in (False, True):
            moe.set_fused_loss(fused)

            def step():
                moe.zero_grad(set_to_none=True)
                moe(input_ids, mask, labels).loss.backward()

            step()  # warm-up
            moe.zero_grad(set_to_none=True)
            peak_mib = peak_memory(step).get("memory_extra")
            times = []
            for _ in range(args.repeats):
                sync()
                start = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - start)
            name = "fused (chunked)" if fused else "plain"
            mib = "n/a" if peak_mib is None else f"{peak_mib:.0f}"
            print(f"| {routing} | {name} | {mib} | {statistics.median(times):.2f} |")


if __name__ == "__main__":
    main()
