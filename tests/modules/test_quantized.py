"""MoE-LoRA on quantized bases (QLoRA, issue 23 item 1): bitsandbytes 4-bit and 8-bit linear layers.

A 1-layer tiny Llama (hidden 64: bitsandbytes quantizes in blocks of 64) is saved once and loaded back with
``BitsAndBytesConfig``, as a user loads a hub model. The experts take the base layer's compute dtype (float32 masters),
never its integer storage dtype; the quantized weights stay as loaded and frozen; every backend trains; gradients cross
the quantized layers (after a CPU evaluation too); the MoE-LoRA on a 4-bit base equals the same experts on the
dequantized float base; a checkpoint trained on a 4-bit base loads on the float base.
"""

import sys

import pytest
import torch
from moe_models import batch, randomize_experts, tiny_llama

from dylora_moe import DyLoRA_MoE, inject_moe_lora
from dylora_moe.io.checkpoint import save_checkpoint
from dylora_moe.modules.layer import adapter_dtype, compute_dtype
from tolerances import assert_close

bnb = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'dylora-moe[quant]')")
from bitsandbytes.functional import dequantize_4bit  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

HIDDEN = 64
FOUR_BIT = {"load_in_4bit": True}
EIGHT_BIT = {"load_in_8bit": True}
BITS = {"4bit": FOUR_BIT, "8bit": EIGHT_BIT}
QUANTIZED = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}


def _float_base():
    return tiny_llama(layers=1, hidden=HIDDEN)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The float tiny Llama's folder (what from_pretrained quantizes on loading)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    _float_base().save_pretrained(folder)
    return folder


def _load(folder, **bnb_options):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**bnb_options))


def _linear4bit(model) -> list:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _quantized_bytes(model) -> dict[str, torch.Tensor]:
    """The integer weights by the base model's names (an injected layer holds its base as ``.base_layer``)."""
    return {
        n.replace(".base_layer", ""): p.detach().clone()
        for n, p in model.named_parameters()
        if not p.is_floating_point()
    }


def _token_routing(num_experts: int, shape=(3, 7), k: int = 2, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(shape[0] * shape[1])])
    return ids.view(*shape, k), torch.rand(*shape, k, generator=gen)


@pytest.mark.parametrize("bits", BITS)
def test_experts_take_the_compute_dtype_and_the_base_stays_frozen(saved, bits):
    model = _load(saved, **BITS[bits])
    stored = _quantized_bytes(model)
    assert stored, "the base was not quantized"
    model.eval()
    with torch.no_grad():  # a CPU evaluation before injection: bitsandbytes repacks 4-bit weights (undone below)
        model(batch()[0])
    if bits == "4bit" and bnb.functional.has_avx512bf16():  # the CPUs where bitsandbytes has that layout
        assert any(m.weight.quant_state.packing_format_for_cpu for m in _linear4bit(model))
    handle = inject_moe_lora(model, num_experts=2, r=4, alpha=8, kernel="eager")
    for layer in handle.layers.values():
        assert isinstance(layer.base_layer, QUANTIZED[bits])
        assert not layer.base_layer.weight.is_floating_point()  # storage: packed integers
        assert compute_dtype(layer.base_layer) == torch.float32
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32 and layer.lora_A.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.lora_{ab}" for name in handle.layers for ab in "AB"
    }
    after = _quantized_bytes(model)
    assert after.keys() == stored.keys() and all(torch.equal(after[n], stored[n]) for n in stored)  # as loaded
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _linear4bit(model))


def test_half_precision_compute_dtype_keeps_float32_masters(saved):
    model = _load(saved, **FOUR_BIT, bnb_4bit_compute_dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert compute_dtype(layer) == torch.bfloat16 and adapter_dtype(layer) == torch.float32
    handle = inject_moe_lora(model, num_experts=1, r=4, alpha=8, kernel="eager")
    assert all(layer.lora_A.dtype == torch.float32 for layer in handle.layers.values())


def _evaluate_then_train(model, handle, routing=None):
    """A CPU evaluation (eval mode, no gradients: where bitsandbytes would repack a 4-bit weight for a kernel without
    backward), then one training forward and backward with inputs_embeds that require grad (the gradient must reach
    the input). Returns (evaluation logits, training loss, input gradient, {layer: (grad A, grad B)})."""
    ids, mask, labels = batch()
    handle.set_routing(*(routing or _token_routing(handle.num_experts)))
    model.eval()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    model.train()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {name: (layer.lora_A.grad, layer.lora_B.grad) for name, layer in handle.layers.items()}
    return logits, loss.detach(), embeds.grad, grads


@pytest.mark.parametrize("bits,mixture", [("4bit", "linear"), ("8bit", "linear"), ("4bit", "ffn")])
def test_every_layer_backend_trains_and_gradients_reach_the_input(saved, bits, mixture):
    results = {}
    for backend in ("eager", "loop", "triton"):  # triton: the kernels under the interpreter on the CPU
        model = _load(saved, **BITS[bits])
        torch.manual_seed(0)  # the same A in every run
        handle = inject_moe_lora(model, num_experts=3, r=4, alpha=8, kernel=backend, mixture=mixture)
        randomize_experts(handle.layers.values())
        results[backend] = _evaluate_then_train(model, handle)
        _, loss, input_grad, grads = results[backend]
        assert torch.isfinite(loss) and input_grad is not None and input_grad.abs().sum() > 0, backend
        for name, (grad_a, grad_b) in grads.items():
            assert grad_a is not None and grad_a.abs().sum() > 0, f"{backend}: no gradient reached {name}.lora_A"
            assert grad_b is not None and grad_b.abs().sum() > 0, f"{backend}: no gradient reached {name}.lora_B"
    _, loss, input_grad, grads = results["eager"]
    for backend in ("loop", "triton"):
        _, other_loss, other_input_grad, other_grads = results[backend]
        assert_close(other_loss, loss, torch.float32, msg=backend)
        assert_close(other_input_grad, input_grad, torch.float32, scale=10, msg=backend)
        for name in grads:
            assert_close(other_grads[name][1], grads[name][1], torch.float32, scale=10, msg=f"{backend} {name}")


def _dequantized_float_base(quantized_model):
    """The float tiny Llama whose linear weights are the 4-bit model's, dequantized."""
    base = _float_base()
    changed = 0
    for name, module in quantized_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
            target = base.get_submodule(name.removesuffix(".base_layer")).weight  # an injected model's too
            changed += not torch.equal(weight, target.data)
            target.data = weight.to(target.dtype)
    assert changed, "4-bit quantization left every weight exact: the comparison would prove nothing"
    return base


@pytest.mark.parametrize("mixture", ["linear", "ffn"])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_4bit_base_equals_the_same_experts_on_the_dequantized_float_base(saved, mixture, backend):
    quantized = _load(saved, **FOUR_BIT)
    dequantized = _dequantized_float_base(quantized)
    q_handle = inject_moe_lora(quantized, num_experts=3, r=4, alpha=8, kernel=backend, mixture=mixture)
    f_handle = inject_moe_lora(dequantized, num_experts=3, r=4, alpha=8, kernel=backend, mixture=mixture)
    randomize_experts(q_handle.layers.values())
    with torch.no_grad():
        for name, layer in q_handle.layers.items():
            f_handle.layers[name].lora_A.copy_(layer.lora_A)
            f_handle.layers[name].lora_B.copy_(layer.lora_B)
    routing = _token_routing(3)
    logits, loss, input_grad, grads = _evaluate_then_train(quantized, q_handle, routing)
    f_logits, f_loss, f_input_grad, f_grads = _evaluate_then_train(dequantized, f_handle, routing)
    # Same weights, same math: fp32 summation order apart (bitsandbytes dequantizes, then one float32 matmul); the
    # gradients too, after an evaluation (bitsandbytes' CPU inference layout would have cut them at each 4-bit layer).
    assert_close(logits, f_logits, torch.float32)
    assert_close(loss, f_loss, torch.float32)
    assert_close(input_grad, f_input_grad, torch.float32, scale=10)
    for name, (grad_a, grad_b) in grads.items():
        assert_close(grad_a, f_grads[name][0], torch.float32, scale=10, msg=name)
        assert_close(grad_b, f_grads[name][1], torch.float32, scale=10, msg=name)
    ids, mask, _ = batch()
    with torch.no_grad(), q_handle.adapters_disabled():
        base_only = quantized(ids, attention_mask=mask).logits
    assert (logits - base_only).abs().max() > 1e-2  # the experts do change the output


@pytest.mark.parametrize(
    "bits,backend",
    [("4bit", "eager"), ("4bit", "reference"), ("4bit", "triton"), ("8bit", "eager"), ("8bit", "reference")],
)
def test_dylora_moe_with_quantization_config(saved, bits, backend):
    config = BitsAndBytesConfig(**BITS[bits])
    moe = DyLoRA_MoE(str(saved), num_experts=2, lora_r=4, backend=backend, routing="token", quantization_config=config)
    assert isinstance(moe.foundation_model.model.layers[0].self_attn.q_proj.base_layer, QUANTIZED[bits])
    assert moe.router.gate.weight.dtype == torch.float32
    randomize_experts(moe.handle.layers.values())
    moe.train()
    ids, mask, labels = batch()
    out = moe(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert moe.router.gate.weight.grad.abs().sum() > 0
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in moe.handle.layers.values())


def test_reference_backend_equals_eager_on_a_4bit_base(saved):
    """The original algorithm on peft's own bitsandbytes LoRA layers gives the fast path's loss."""
    config = BitsAndBytesConfig(**FOUR_BIT)
    moe = DyLoRA_MoE(str(saved), num_experts=2, lora_r=4, lora_dropout=0.0, backend="eager", quantization_config=config)
    randomize_experts(moe.handle.layers.values())
    moe.train()
    ids, mask, labels = batch()
    losses = []
    for backend in ("eager", "reference"):
        moe.set_backend(backend)
        losses.append(moe(ids, attention_mask=mask, labels=labels).lm_loss.detach())
    assert_close(losses[1], losses[0], torch.float32)


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_fused_loss_over_a_quantized_output_head(saved, routing):
    """A 4-bit head (``llm_int8_skip_modules=[]`` quantizes it too) computes through its module: the fused loss,
    which reads a float head weight, falls back to the plain loss instead of reading packed bytes."""
    config = BitsAndBytesConfig(**FOUR_BIT, llm_int8_skip_modules=[])
    ids, mask, labels = batch()
    losses = []
    for fused in (False, True):
        moe = DyLoRA_MoE(
            str(saved), num_experts=2, lora_r=4, lora_dropout=0.0, routing=routing, fused_loss=fused,
            backend="eager", quantization_config=config,
        )  # fmt: skip
        assert isinstance(moe.foundation_model.get_output_embeddings(), bnb.nn.Linear4bit)
        moe.train()
        losses.append(moe(ids, attention_mask=mask, labels=labels).lm_loss.detach())
    assert_close(losses[1], losses[0], torch.float32)


def test_activation_checkpointing_on_a_4bit_base(saved):
    moe = DyLoRA_MoE(
        str(saved), num_experts=2, lora_r=4, backend="eager", quantization_config=BitsAndBytesConfig(**FOUR_BIT)
    )
    moe.gradient_checkpointing_enable({"use_reentrant": True})  # the reentrant form needs inputs that require grad
    randomize_experts(moe.handle.layers.values())
    moe.train()
    ids, mask, labels = batch()
    moe(ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(layer.lora_A.grad.abs().sum() > 0 for layer in moe.handle.layers.values())


def test_checkpoint_trained_on_a_4bit_base_loads_on_the_float_base(saved, tmp_path):
    config = BitsAndBytesConfig(**FOUR_BIT)
    moe = DyLoRA_MoE(str(saved), num_experts=2, lora_r=4, backend="eager", routing="token", quantization_config=config)
    optimizer = torch.optim.AdamW(moe.trainable_parameters(), lr=1e-2)
    ids, mask, labels = batch()
    moe.train()
    for _ in range(2):
        moe(ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_checkpoint(moe, tmp_path / "ckpt")
    moe.eval()
    with torch.no_grad():
        quantized_logits = moe(ids, attention_mask=mask).logits

    # On the dequantized float base: the same model, so the same logits.
    dequantized = DyLoRA_MoE.from_pretrained(_dequantized_float_base(moe.foundation_model), tmp_path / "ckpt")
    for name, layer in moe.handle.layers.items():
        loaded = dequantized.handle.layers[name]
        assert loaded.lora_A.dtype == torch.float32
        assert torch.equal(loaded.lora_A, layer.lora_A) and torch.equal(loaded.lora_B, layer.lora_B)
    assert torch.equal(dequantized.router.gate.weight, moe.router.gate.weight)
    dequantized.eval()
    with torch.no_grad():
        assert_close(dequantized(ids, attention_mask=mask).logits, quantized_logits, torch.float32)

    # On the original float base (a plain folder, no quantization): the experts are adapters.
    on_float = DyLoRA_MoE.from_pretrained(str(saved), tmp_path / "ckpt")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in on_float.modules())
    assert all(
        torch.equal(on_float.handle.layers[name].lora_B, layer.lora_B) for name, layer in moe.handle.layers.items()
    )
    # And back on a 4-bit base, loaded by name.
    again = DyLoRA_MoE.from_pretrained(str(saved), tmp_path / "ckpt", quantization_config=config)
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask).logits, quantized_logits)


def test_quantization_config_with_a_built_model_is_refused():
    with pytest.raises(ValueError, match="quantization_config applies when the base model is loaded from"):
        DyLoRA_MoE(_float_base(), num_experts=1, quantization_config=BitsAndBytesConfig(**FOUR_BIT))


def test_missing_bitsandbytes_names_the_extra(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    with pytest.raises(ImportError, match=r"quantization_config needs bitsandbytes.*pip install 'dylora-moe\[quant\]'"):
        DyLoRA_MoE(str(saved), num_experts=1, quantization_config=BitsAndBytesConfig(**FOUR_BIT))
