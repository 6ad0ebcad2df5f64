"""Generation under each routing on a tiny DyLoRA_MoE (CPU, eager kernels, a few new tokens)."""

import pytest
import torch

from dylora_moe.evaluate.generation import Sampling, generate_completions, routings_of

from .eval_models import tiny_base

FEW = Sampling(max_new_tokens=6, batch_size=4)


def _texts(generations):
    return [g.completion for g in generations]


def test_routings_of_a_moe_and_of_a_plain_model(moe, tokenizer):
    assert routings_of(moe) == ["base", "learned", "expert_0", "expert_1"]
    assert routings_of(tiny_base(tokenizer)) == ["base"]
    with pytest.raises(ValueError, match="unknown routing 'expert_2'"):
        generate_completions(moe, tokenizer, [], "expert_2")


def test_batched_equals_one_at_a_time(moe, tokenizer, problems):
    # left padding and the KV cache give the same greedy completions as unpadded single prompts
    batched = generate_completions(moe, tokenizer, problems, "learned", FEW)
    single = generate_completions(moe, tokenizer, problems, "learned", Sampling(max_new_tokens=6, batch_size=1))
    assert _texts(batched) == _texts(single)
    flat = [w for g in batched for w in g.expert_weights]
    assert flat == pytest.approx([w for g in single for w in g.expert_weights], abs=1e-5)


def test_forced_experts_differ_and_learned_weights_are_the_routers(moe, tokenizer, problems):
    e0 = generate_completions(moe, tokenizer, problems, "expert_0", FEW)
    e1 = generate_completions(moe, tokenizer, problems, "expert_1", FEW)
    assert [g.expert_weights for g in e0] == [[1.0, 0.0]] * len(problems)
    assert _texts(e0) != _texts(e1)  # random non-zero experts: forcing one changes what is written
    learned = generate_completions(moe, tokenizer, problems, "learned", FEW)
    for g in learned:
        ids = tokenizer(g.problem.prompt, return_tensors="pt")["input_ids"]
        expected = moe.prompt_expert_weights(ids)[0].tolist()
        assert g.expert_weights == pytest.approx(expected, abs=1e-5) and sum(expected) == pytest.approx(1.0)


def test_base_routing_is_the_frozen_base_model(moe, tokenizer, problems):
    plain = tiny_base(tokenizer)  # the same seeded weights, never injected
    assert _texts(generate_completions(moe, tokenizer, problems, "base", FEW)) == _texts(
        generate_completions(plain, tokenizer, problems, "base", FEW)
    )


def test_expert_weights_hook(moe, tokenizer):
    ids = tokenizer(["def f():", "x = 1"], return_tensors="pt", padding=True)
    ids, mask = ids["input_ids"], ids["attention_mask"]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    routed = moe.generate(ids, mask, **kwargs)
    assert torch.equal(routed, moe.generate(ids, mask, expert_weights=moe.prompt_expert_weights(ids, mask), **kwargs))
    with pytest.raises(ValueError, match=r"expert_weights \(2, 3\) must be \[batch, num_experts\]"):
        moe.generate(ids, mask, expert_weights=torch.ones(2, 3), **kwargs)


def test_completions_are_cut_at_stop_sequences_and_sampling_is_seeded(moe, tokenizer, problems):
    sampled = Sampling(n=2, greedy=False, temperature=1.0, max_new_tokens=12, seed=5)
    first = generate_completions(moe, tokenizer, problems, "learned", sampled)
    assert [(g.problem.task_id, g.sample) for g in first] == [(p.task_id, s) for p in problems for s in range(2)]
    for g in first:
        assert g.completion.startswith(g.problem.prompt)
        assert not any(stop in g.completion[len(g.problem.prompt) :] for stop in g.problem.stop_sequences)
    assert _texts(first) == _texts(generate_completions(moe, tokenizer, problems, "learned", sampled))


def test_bad_sampling_is_named():
    with pytest.raises(ValueError, match="greedy decoding gives one"):
        Sampling(n=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sampling(max_new_tokens=0)
