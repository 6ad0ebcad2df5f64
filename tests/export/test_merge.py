"""moe.merged: a plain transformers model equal to the MoE with its routing fixed (docs/export.md)."""

import json
import subprocess
import sys

import pytest
import torch
from moe_models import batch, randomize_experts, tiny_gpt2, tiny_llama

from dylora_moe import DyLoRA_MoE
from dylora_moe.export.merge import MergeError, logit_mix_gap, merged_delta
from dylora_moe.modules.routing import Routing

GENERATE = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)


def trained_like(build=tiny_llama, num_experts=3, **kwargs):
    kwargs.setdefault("backend", "eager")
    moe = DyLoRA_MoE(build(), num_experts=num_experts, lora_r=4, lora_alpha=8, top_k=2, **kwargs)
    randomize_experts(moe.handle.layers.values())
    with torch.no_grad():
        moe.router.gate.weight.normal_()
    return moe.eval()


def fixed_routing_logits(moe, input_ids, mask, weights: torch.Tensor) -> torch.Tensor:
    """The MoE's logits with every row routed to the mix ``weights`` [E] in every layer (what generate does)."""
    rows = input_ids.shape[0]
    experts = torch.arange(moe.num_experts).expand(rows, 1, -1)
    with torch.no_grad(), moe.handle.context.routed(Routing(experts, weights.expand(rows, 1, -1).float())):
        return moe.foundation_model(input_ids=input_ids, attention_mask=mask).logits


CASES = [(tiny_llama, "linear"), (tiny_gpt2, "linear"), (tiny_llama, "ffn")]


@pytest.mark.parametrize(("build", "mixture"), CASES, ids=["llama", "gpt2-conv1d", "llama-ffn"])
def test_one_expert_merge_equals_forced_expert_and_generates_the_same_tokens(build, mixture):
    moe = trained_like(build, mixture=mixture)
    input_ids, mask, _ = batch()
    prompt = input_ids[:1, :5]
    for expert in range(3):
        merged = moe.merged(expert=expert)
        assert type(merged) is type(moe.foundation_model)
        assert not any("MoELoRA" in type(m).__name__ for m in merged.modules())
        one_hot = torch.nn.functional.one_hot(torch.tensor(expert), 3).float()
        with torch.no_grad():
            torch.testing.assert_close(
                merged(input_ids=input_ids, attention_mask=mask).logits,
                fixed_routing_logits(moe, input_ids, mask, one_hot),
                atol=1e-5, rtol=1e-5,
            )  # fmt: skip
            expected = moe.generate(prompt, expert_weights=one_hot[None], **GENERATE)
            assert torch.equal(merged.generate(prompt, **GENERATE), expected)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_mix_merge_equals_the_in_layer_mix(build):
    moe = trained_like(build)
    input_ids, mask, _ = batch()
    mix = [0.2, 0.5, 0.3]
    merged = moe.merged(weights=mix)
    with torch.no_grad():
        got = merged(input_ids=input_ids, attention_mask=mask).logits
        torch.testing.assert_close(
            got, fixed_routing_logits(moe, input_ids, mask, torch.tensor(mix)), atol=1e-5, rtol=1e-5
        )
        prompt = input_ids[:1, :5]
        expected = moe.generate(prompt, expert_weights=torch.tensor([mix]), **GENERATE)
        assert torch.equal(merged.generate(prompt, **GENERATE), expected)


def test_sequence_routing_logit_mix_is_not_a_weight_merge():
    """Sequence routing's forward (the original's) mixes the experts' logits; a merge of the mix does not. One
    expert is the same either way; a mix differs, by less than the experts differ among themselves (docs/export.md
    states the size measured here)."""
    moe = trained_like()
    input_ids, mask, _ = batch()
    one = logit_mix_gap(moe, input_ids, mask, [0.0, 1.0, 0.0])
    assert one["max_abs_logit"] < 1e-5 and abs(one["mean_kl"]) < 1e-6
    gap = logit_mix_gap(moe, input_ids, mask, [0.2, 0.5, 0.3])
    with torch.no_grad():
        per_expert = [fixed_routing_logits(moe, input_ids, mask, torch.eye(3)[e])[mask.bool()] for e in range(3)]
    spread = max((a - b).abs().max().item() for a in per_expert for b in per_expert)
    assert 1e-3 < gap["max_abs_logit"] < spread and gap["mean_kl"] > 1e-5


@pytest.mark.parametrize("backend", ["eager", "reference", "triton"])
def test_merge_matches_the_moe_on_every_backend(backend):
    moe = trained_like(backend=backend)
    input_ids, mask, _ = batch(rows=2, length=5)
    merged = moe.merged(expert=1)
    with torch.no_grad():
        expected = fixed_routing_logits(moe, input_ids, mask, torch.eye(3)[1])
        torch.testing.assert_close(
            merged(input_ids=input_ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5
        )


def test_merge_is_a_copy_and_leaves_the_moe_untouched():
    moe = trained_like()
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    merged = moe.merged(weights=[0.1, 0.6, 0.3])
    after = moe.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    moe_storage = {p.untyped_storage().data_ptr() for p in moe.parameters()}
    assert not any(p.untyped_storage().data_ptr() in moe_storage for p in merged.parameters())
    assert all(p.requires_grad for p in merged.parameters())  # a plain model, as from_pretrained gives it
    assert moe.handle.layers  # the MoE keeps its layers


def test_bf16_merge_rounds_once():
    moe = trained_like(torch_dtype=None)
    moe.foundation_model.to(torch.bfloat16)
    for layer in moe.handle.layers.values():
        layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float()
    mix = torch.tensor([0.3, 0.3, 0.4])
    merged = moe.merged(weights=mix)
    twice = 0
    for name, layer in moe.handle.layers.items():
        weight = layer.base_layer.weight
        delta = merged_delta(layer, mix)
        once = (weight.float() + delta).to(torch.bfloat16)
        got = merged.get_submodule(name).weight
        assert got.dtype == torch.bfloat16 and torch.equal(got, once), name
        twice += int((weight + delta.to(torch.bfloat16) != once).sum())
    assert twice > 0  # rounding the delta first would give other weights: the check above can fail


def test_refusals_name_the_reason():
    moe = trained_like()
    with pytest.raises(MergeError, match="exactly one of"):
        moe.merged()
    with pytest.raises(MergeError, match="exactly one of"):
        moe.merged(expert=0, weights=[1, 0, 0])
    with pytest.raises(MergeError, match=r"expert must be an int in \[0, 3\)"):
        moe.merged(expert=3)
    with pytest.raises(MergeError, match="weights has 2 values; the model has 3 experts"):
        moe.merged(weights=[0.5, 0.5])
    with pytest.raises(MergeError, match="finite"):
        moe.merged(weights=[float("nan"), 0, 1])
    ffn = trained_like(mixture="ffn")
    with pytest.raises(MergeError, match="mixture='ffn'"):
        ffn.merged(weights=[0.5, 0.5, 0.0])
    ffn.merged(weights=[0.0, 1.0, 0.0])  # one expert given as weights merges
    # A quantized base layer (bitsandbytes keeps packed integer weights): refused, naming the layer.
    name, layer = next(iter(moe.handle.layers.items()))
    layer.base_layer.weight = torch.nn.Parameter(torch.zeros_like(layer.base_layer.weight, dtype=torch.uint8),
                                                 requires_grad=False)  # fmt: skip
    with pytest.raises(MergeError, match=f"cannot merge into {name}: its base weight is torch.uint8"):
        moe.merged(expert=0)


LOAD_ALONE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
prompt = torch.tensor(json.loads(sys.argv[2]))
tokens = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
assert not [m for m in sys.modules if m.startswith("dylora_moe")], "dylora_moe was imported"
print(json.dumps(tokens.tolist()))
"""


def test_saved_merge_loads_and_generates_in_a_process_without_dylora_moe(tmp_path):
    moe = trained_like()
    prompt = batch()[0][:1, :5]
    moe.merged(expert=2).save_pretrained(tmp_path / "merged")
    out = subprocess.run(
        [sys.executable, "-c", LOAD_ALONE, str(tmp_path / "merged"), json.dumps(prompt.tolist())],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    expected = moe.generate(prompt, expert_weights=torch.eye(3)[2][None], **GENERATE)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected.tolist()
