"""Completions of benchmark prompts by a model: batched, with the KV cache, under a chosen routing.

Routings of a :class:`~dylora_moe.DyLoRA_MoE`: ``"learned"`` (the router's per-sequence weights for the prompt, as
``DyLoRA_MoE.generate`` uses them), ``"expert_<i>"`` (expert i forced for every problem: one-hot weights) and
``"base"`` (adapters off: the frozen base model alone). A plain Hugging Face causal LM has only ``"base"``.

Greedy decoding gives pass@1; sampling (temperature, top-p; the bigcode harness uses 0.2 / 0.95 for pass@1 and
0.8 for pass@10 / @100) gives n samples per problem for pass@k. Prompts are left-padded in batches; a row stops
when its continuation holds a stop sequence of its benchmark (checked on the generated text only, as the harness
does) or EOS, or after ``max_new_tokens``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .problems import Problem

BASE, LEARNED, EXPERT = "base", "learned", "expert_"


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn. ``n`` samples per problem; ``greedy`` (n must be 1) or temperature / top-p
    sampling; ``max_new_tokens`` per completion (the harness's 512 is its total length); prompts per forward
    ``batch_size``; ``seed`` for sampling."""

    n: int = 1
    greedy: bool = True
    temperature: float = 0.2
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("n", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if self.greedy and self.n != 1:
            raise ValueError(f"greedy decoding gives one completion per problem; n={self.n} needs sampling")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1]; got {self.temperature}, {self.top_p}")


@dataclass
class Generation:
    """One completion: a whole program (prompt + continuation cut at the first stop sequence), the routing it was
    generated under, and the per-sequence expert weights used (None for the base model)."""

    problem: Problem
    sample: int
    routing: str
    completion: str
    expert_weights: list[float] | None


class StopOnSequences(StoppingCriteria):
    """Per row: done when the text generated after the prompt holds any stop sequence of its problem."""

    def __init__(self, tokenizer, prompt_length: int, stops: Sequence[Sequence[str]]):
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, stops

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [any(stop in text for stop in stops) for text, stops in zip(texts, self.stops)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def is_moe(model) -> bool:
    from ..model import DyLoRA_MoE

    return isinstance(model, DyLoRA_MoE)


def routings_of(model) -> list[str]:
    """Every routing ``model`` can generate under: base, learned, and each expert forced (MoE), or base alone."""
    if not is_moe(model):
        return [BASE]
    return [BASE, LEARNED, *(f"{EXPERT}{i}" for i in range(model.num_experts))]


def check_routing(model, routing: str) -> None:
    if routing not in routings_of(model):
        raise ValueError(f"unknown routing {routing!r} for this model; expected one of {routings_of(model)}")


@contextlib.contextmanager
def _left_padding(tokenizer):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batches: every prompt ends where generation starts
    try:
        yield
    finally:
        tokenizer.padding_side = side


def _decode(model, routing: str, ids, mask, kwargs):
    """Generated ids [B, S + new] and the expert weights [B, E] used (None for the base model)."""
    if routing == BASE:
        if not is_moe(model):
            return model.generate(input_ids=ids, attention_mask=mask, **kwargs), None
        with model.handle.adapters_disabled():
            return model.foundation_model.generate(input_ids=ids, attention_mask=mask, **kwargs), None
    if routing == LEARNED:
        weights = model.prompt_expert_weights(ids, mask)
    else:
        expert = torch.full((ids.shape[0],), int(routing[len(EXPERT) :]), device=ids.device)
        weights = torch.nn.functional.one_hot(expert, model.num_experts).float()
    return model.generate(ids, mask, expert_weights=weights, **kwargs), weights


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    problems: Sequence[Problem],
    routing: str = LEARNED,
    sampling: Sampling = Sampling(),
    progress=None,
) -> list[Generation]:
    """``sampling.n`` completions of every problem under ``routing``, in problem order (samples consecutive).
    ``progress``: a bar (:func:`dylora_moe.progress.bar`) advanced by each batch's completions."""
    check_routing(model, routing)
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token to batch prompts (set tokenizer.pad_token)")
    kwargs = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if sampling.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
        torch.manual_seed(sampling.seed)
    device = model.device
    rows = [(problem, sample) for problem in problems for sample in range(sampling.n)]
    out: list[Generation] = []
    was_training = model.training
    model.eval()
    try:
        with _left_padding(tokenizer):
            for start in range(0, len(rows), sampling.batch_size):
                batch = rows[start : start + sampling.batch_size]
                encoded = tokenizer([p.prompt for p, _ in batch], return_tensors="pt", padding=True)
                ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
                stop = StopOnSequences(tokenizer, ids.shape[1], [p.stop_sequences for p, _ in batch])
                generated, weights = _decode(
                    model, routing, ids, mask, {**kwargs, "stopping_criteria": StoppingCriteriaList([stop])}
                )
                texts = tokenizer.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True)
                for i, ((problem, sample), text) in enumerate(zip(batch, texts)):
                    w = None if weights is None else [round(float(x), 6) for x in weights[i]]
                    out.append(Generation(problem, sample, routing, problem.completion(text), w))
                if progress is not None:
                    progress.update(len(batch))
    finally:
        model.train(was_training)
    return out
