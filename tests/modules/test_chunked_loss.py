"""Chunked linear + cross-entropy (dylora_moe.modules.fused_loss) and DyLoRA_MoE's fused_loss mode.

The op against the float64 formula (values and gradients of hidden, weight, bias, bias scale; soft-capping; odd chunk
sizes; ignored rows); the model's fused loss against its plain loss, token and sequence routing; and the point of it
all: no tensor of the full [B, S, V] logits' size is ever allocated (a dispatch mode watches every op's output).
"""

import pytest
import torch
import torch.nn.functional as F
from moe_models import batch, randomize_experts, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

from dylora_moe import DyLoRA_MoE, DyLoRAMoEConfig
from dylora_moe.modules.fused_loss import chunked_linear_cross_entropy, default_chunk_rows


def formula(hidden, weight, targets, bias=None, bias_scale=None, softcap=None):
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + (1 if bias_scale is None else bias_scale.double()[:, None]) * bias.double()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return F.cross_entropy(z, targets, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk_rows", [1, 5, 64, None])
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_values_and_gradients_match_the_formula(chunk_rows, biased, softcap):
    gen = torch.Generator().manual_seed(3)
    n, h, v = 23, 12, 97
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen).mul_(0.3).requires_grad_()
    bias = torch.randn(v, generator=gen).requires_grad_() if biased else None
    scale = torch.rand(n, generator=gen).requires_grad_() if biased else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::4] = -100
    leaves = [t for t in (hidden, weight, bias, scale) if t is not None]
    want = formula(hidden, weight, targets, bias, scale, softcap)
    want_grads = torch.autograd.grad(want, leaves)
    got = chunked_linear_cross_entropy(
        hidden, weight, targets, bias=bias, bias_scale=scale, softcap=softcap, chunk_rows=chunk_rows
    )
    got_grads = torch.autograd.grad(got * 0.5, leaves)  # a non-unit incoming gradient is applied
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, 0.5 * w, rtol=1e-5, atol=1e-5)


def test_no_label_and_no_rows_give_zero():
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)
    loss = chunked_linear_cross_entropy(hidden, weight, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().max() == 0
    empty = chunked_linear_cross_entropy(torch.zeros(0, 8), weight, torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"hidden \[N, H\] and weight \[V, H\]"):
        chunked_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be"):
        chunked_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long))


def test_default_chunks_hold_logits_about_the_size_of_the_hidden_states():
    assert default_chunk_rows(4096, 2048, 256_000) == 64  # 4096 / ceil(256000 / 2048) = 32.8 -> 33 -> 64
    assert default_chunk_rows(10, 64, 32) == 16  # small vocabulary: one chunk (a power of two >= N)


class LargestTensor(TorchDispatchMode):
    """Largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


VOCAB = 1000


def build(routing, bias=False, **kw):
    base = tiny_llama(layers=1)
    head = torch.nn.Linear(32, VOCAB, bias=bias)  # a larger vocabulary than the tiny model's 100
    base.lm_head = head.requires_grad_(False)
    base.resize_token_embeddings(VOCAB)
    moe = DyLoRA_MoE(
        base, num_experts=3, lora_r=4, lora_alpha=8, lora_dropout=0.0, kernel="eager", routing=routing, top_k=2, **kw
    ).train()
    randomize_experts(moe.handle.layers.values())
    return moe


def loss_and_grads(moe, inputs):
    moe.zero_grad(set_to_none=True)
    out = moe(*inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}


CASES = [
    pytest.param("token", False, {}, id="token"),
    pytest.param("sequence", False, {}, id="sequence"),
    pytest.param("sequence", True, {"sequence_top_k": 2}, id="sequence-top2-bias"),
    pytest.param("sequence", True, {}, id="sequence-bias"),
]


@pytest.mark.parametrize("routing, bias, kw", CASES)
def test_fused_loss_equals_the_plain_loss_without_full_logits(routing, bias, kw):
    moe = build(routing, bias, z_loss_coefficient=1e-2, **kw)
    input_ids, mask, labels = batch(rows=4, length=24)  # B * S * V well above the head's V * H = 32k
    mask[2, :2] = 0  # a left-padded row too
    inputs = (input_ids, mask, labels.masked_fill(mask == 0, -100))
    want, want_grads = loss_and_grads(moe, inputs)
    moe.set_fused_loss(True, chunk_rows=4)
    with LargestTensor() as watch:
        got, got_grads = loss_and_grads(moe, inputs)
    assert got.logits is None
    assert watch.largest < input_ids.numel() * VOCAB // 2  # never the full logits (or the shifted ones)
    torch.testing.assert_close(got.lm_loss, want.lm_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    assert set(got_grads) == set(want_grads) and "router.gate.weight" in got_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_plain_loss_allocates_the_full_logits():
    """The watcher is not vacuous: the plain loss does allocate [B, S, V]."""
    moe = build("token")
    with LargestTensor() as watch:
        loss_and_grads(moe, batch(rows=4, length=24))
    assert watch.largest >= 4 * 24 * VOCAB


def test_auto_mode_fuses_in_training_only_and_logits_come_back_without_labels():
    moe = build("token")
    moe.set_fused_loss("auto")
    input_ids, mask, labels = batch(rows=2, length=5)
    assert moe(input_ids, mask, labels).logits is None
    moe.eval()
    out = moe(input_ids, mask, labels)
    assert out.logits.shape == (2, 5, VOCAB) and out.loss is not None
    moe.train()
    assert moe(input_ids, mask).logits.shape == (2, 5, VOCAB)


def test_soft_capped_head_token_routing_fuses_sequence_routing_keeps_the_plain_loss():
    for routing in ("token", "sequence"):
        moe = build(routing)
        moe.foundation_model.config.final_logit_softcapping = 3.0
        inputs = batch(rows=2, length=5)
        want, want_grads = loss_and_grads(moe, inputs)
        moe.set_fused_loss(True)
        got, got_grads = loss_and_grads(moe, inputs)
        assert (got.logits is None) == (routing == "token")
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bad_fused_loss_arguments():
    moe = build("token")
    with pytest.raises(ValueError, match="fused_loss must be False, True or 'auto'"):
        moe.set_fused_loss("yes")
    with pytest.raises(ValueError, match="fused_loss must be False, True or 'auto'"):
        DyLoRAMoEConfig(fused_loss=1)
    with pytest.raises(ValueError, match="chunk_rows"):
        moe.set_fused_loss(True, chunk_rows=0)


def test_fused_loss_is_a_setting_kept_by_the_config():
    """DyLoRA_MoE(fused_loss=...) and DyLoRAMoEConfig(fused_loss=...) set the mode; moe_config gives it back."""
    moe = build("token", fused_loss="auto")
    assert moe.fused_loss == "auto" and moe.moe_config.fused_loss == "auto"
    input_ids, mask, labels = batch(rows=2, length=5)
    assert moe(input_ids, mask, labels).logits is None
    from_config = DyLoRA_MoE(tiny_llama(layers=1), config=DyLoRAMoEConfig(num_experts=2, fused_loss=True))
    assert from_config.fused_loss is True and from_config.moe_config.fused_loss is True
