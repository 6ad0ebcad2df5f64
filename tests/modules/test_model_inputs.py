"""The model's inputs a user can get wrong or stretch (DyLoRA_MoE and inject_moe_lora; issue 17, item 7): beam
search and several returned sequences keep each prompt's routing, a 1-D input_ids is a clear error, and a NaN alpha
is refused by inject_moe_lora as by the config."""

import math

import pytest
import torch
from moe_models import batch, randomize_experts, tiny_llama

from dylora_moe import DyLoRA_MoE, Routing, inject_moe_lora


def build():
    moe = DyLoRA_MoE(tiny_llama(layers=2), num_experts=3, lora_r=4, lora_alpha=8, lora_dropout=0.0, kernel="eager",
                     routing="sequence", top_k=3, sequence_top_k=1).eval()  # fmt: skip
    randomize_experts(moe.handle.layers.values())
    gate = moe.router.gate.weight
    with torch.no_grad():  # a gate that sends the three test prompts to three different experts
        gate.copy_(torch.randn(gate.shape, generator=torch.Generator().manual_seed(0)) * 3)
    return moe


@torch.no_grad()
@pytest.mark.parametrize("gen", [
    dict(num_beams=2),
    dict(num_beams=3, num_return_sequences=2),
    dict(do_sample=True, num_return_sequences=2, top_k=5),
], ids=["beams", "beams-and-returned", "sampled-returned"])  # fmt: skip
def test_every_copy_of_a_prompt_keeps_its_routing(gen):
    moe = build()
    input_ids = batch(rows=3, length=5)[0]
    mask = torch.ones_like(input_ids)
    gen = dict(max_new_tokens=3, pad_token_id=0, **gen)
    torch.manual_seed(0)
    out = moe.generate(input_ids, attention_mask=mask, **gen)
    copies = gen.get("num_return_sequences", 1)
    assert out.shape[0] == 3 * copies
    best = moe(input_ids, mask).sequence_weights.argmax(-1)  # sequence_top_k=1: one expert per prompt, exact
    rows = best.repeat_interleave(max(gen.get("num_beams", 1), copies))
    with moe.handle.context.routed(Routing.per_row(rows)):  # each copy decoded by its own prompt's expert
        torch.manual_seed(0)
        expected = moe.foundation_model.generate(input_ids=input_ids, attention_mask=mask, **gen)
    assert torch.equal(out, expected)
    assert len(set(best.tolist())) > 1  # the prompts do pick different experts (the test can fail)


def test_one_dimensional_input_ids_is_a_clear_error():
    moe = build()
    ids = batch(rows=1, length=5)[0][0]
    for call in (lambda: moe(ids), lambda: moe.generate(ids, max_new_tokens=2)):
        with pytest.raises(ValueError, match=r"\[batch, length\].*input_ids\[None\]"):
            call()
    assert moe(ids[None]).logits.shape[:2] == (1, 5)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, 0.0, -1.0, True])
def test_inject_refuses_an_alpha_the_config_refuses(alpha):
    model = tiny_llama(layers=1)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        inject_moe_lora(model, num_experts=2, r=4, alpha=alpha)
    handle = inject_moe_lora(tiny_llama(layers=1), num_experts=2, r=4, alpha=8.0)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        handle.add_expert(r=4, alpha=alpha)
