"""FFN experts (MixLoRA style): the top-k experts' whole MLP outputs mixed after the nonlinearity, on the moe_lora
op, against a plain loop over experts written here (values and gradients), and against stock peft for one expert."""

import warnings

import pytest
import torch
from moe_models import VOCAB, batch, tiny_gpt2, tiny_llama

from dylora_moe import DyLoRA_MoE, MoELoRAMLP, inject_moe_lora
from dylora_moe.modules.routing import Routing
from tolerances import assert_close

E, R, ALPHA = 3, 4, 8.0


def make_mlp(kernel):
    mlp = tiny_llama(layers=1).model.layers[0].mlp
    layer = MoELoRAMLP(mlp, E, R, ALPHA, kernel=kernel)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for proj in MoELoRAMLP.PROJECTIONS:
            getattr(layer, proj).lora_B.normal_(generator=gen)
    return layer


def loop_over_experts(layer, x, ids, weights):
    """sum_j w[t, j] * MLP_e(x[t]) with e = ids[t, j], each expert's MLP written with plain matmuls."""
    s = ALPHA / R

    def proj(name, inp, e):
        p = getattr(layer, name)
        return inp @ p.base_layer.weight.T + s * (inp @ p.lora_A[e].T) @ p.lora_B[e].T

    out = torch.zeros_like(x)
    for e in range(E):
        y = proj("down_proj", layer.act_fn(proj("gate_proj", x, e)) * proj("up_proj", x, e), e)
        gate = (weights * (ids == e)).sum(-1, keepdim=True)  # weight of expert e for each token (0 if unselected)
        out = out + gate * y
    return out


@pytest.mark.parametrize("kernel", ["eager", "triton"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_mlp_mixture_matches_the_loop_values_and_gradients(kernel, k):
    layer = make_mlp(kernel)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(2, 5, 32, generator=gen, requires_grad=True)
    ids = torch.rand(2, 5, E, generator=gen).argsort(-1)[..., :k]  # k distinct experts per token
    ids[1, 2] = 0 if k == 1 else ids[1, 2]
    raw = torch.rand(2, 5, k, generator=gen)
    weights = (raw / raw.sum(-1, keepdim=True)).requires_grad_()
    layer.context.set(Routing(ids, weights))
    probe = torch.randn(2, 5, 32, generator=gen)

    got = layer(x)
    params = [getattr(layer, p).lora_A for p in MoELoRAMLP.PROJECTIONS] + [
        getattr(layer, p).lora_B for p in MoELoRAMLP.PROJECTIONS
    ]
    grads = torch.autograd.grad((got * probe).sum(), [x, weights, *params])
    want = loop_over_experts(layer, x, ids, weights)
    want_grads = torch.autograd.grad((want * probe).sum(), [x, weights, *params])
    assert_close(got, want, torch.float32)
    for name, g, w in zip(["x", "weights", "A_gate", "A_up", "A_down", "B_gate", "B_up", "B_down"], grads, want_grads):
        assert_close(g, w, torch.float32, scale=4, msg=name)
    assert grads[1].abs().sum() > 0  # the routing weights get a gradient (the router trains)


def test_mixture_is_not_the_linear_mixture():
    """Mixing after the nonlinearity differs from mixing each projection's LoRA delta (so the test above can fail)."""
    layer = make_mlp("eager")
    x = torch.randn(4, 32)
    ids, weights = torch.tensor([[0, 1]] * 4).view(4, 1, 2), torch.full((4, 1, 2), 0.5)
    layer.context.set(Routing(ids, weights))
    with torch.no_grad():
        ffn = layer(x.view(4, 1, 32))
        linear = layer._mlp(x.view(4, 1, 32))  # the projections mix the two experts' deltas themselves
    assert (ffn - linear).abs().max() > 1e-3


@torch.no_grad()
def test_inject_ffn_one_expert_equals_stock_peft_lora_on_the_mlp():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    handle = inject_moe_lora(model, num_experts=2, r=R, alpha=ALPHA, mixture="ffn", kernel="eager")
    assert set(handle.layers) == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in MoELoRAMLP.PROJECTIONS}
    assert isinstance(model.model.layers[0].mlp, MoELoRAMLP)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in handle.layers for ab in "AB"}
    gen = torch.Generator().manual_seed(1)
    for layer in handle.layers.values():
        layer.lora_B.normal_(generator=gen)
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(MoELoRAMLP.PROJECTIONS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(tiny_llama(), config).eval()
    params = dict(peft_model.named_parameters())
    for name, layer in handle.layers.items():
        params[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A[1])
        params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B[1])
    input_ids = torch.randint(0, VOCAB, (2, 6))
    handle.set_active_expert(1)
    assert_close(model(input_ids).logits, peft_model(input_ids).logits, torch.float32)
    with handle.adapters_disabled():
        assert torch.equal(model(input_ids).logits, tiny_llama()(input_ids).logits)
    assert handle.add_expert() == 2 and model.model.layers[1].mlp.num_experts == 3


def test_dylora_moe_with_ffn_experts_trains_every_expert():
    for routing in ("sequence", "token"):
        moe = DyLoRA_MoE(
            tiny_llama(), num_experts=3, lora_r=R, lora_alpha=ALPHA, mixture="ffn", routing=routing, top_k=2,
            renormalize=True, kernel="eager",
        )  # fmt: skip
        assert moe.moe_config.target_modules == ["model.layers.0.mlp", "model.layers.1.mlp"]
        for layer in moe.handle.layers.values():
            with torch.no_grad():
                layer.lora_B.normal_()
        input_ids, mask, labels = batch()
        moe(input_ids, mask, labels).loss.backward()
        down = moe.handle.layers["model.layers.1.mlp.down_proj"]
        assert all(down.lora_A.grad[e].abs().sum() > 0 for e in range(3)), routing
        assert moe.router.gate.weight.grad.abs().sum() > 0, routing


def test_ffn_mixture_bad_input():
    with pytest.raises(ValueError, match="found no gated MLP"):
        inject_moe_lora(tiny_gpt2(), num_experts=2, r=2, alpha=2, mixture="ffn")
    with pytest.raises(ValueError, match="unknown mixture"):
        inject_moe_lora(tiny_llama(), num_experts=2, r=2, alpha=2, mixture="moe")
    with pytest.raises(ValueError, match="no mixture='ffn'"):
        DyLoRA_MoE(tiny_llama(), num_experts=2, mixture="ffn", kernel="reference")
    moe = DyLoRA_MoE(tiny_llama(), num_experts=2, mixture="ffn", kernel="eager")
    with pytest.raises(ValueError, match="no FFN-expert mixture"):
        moe.set_kernel("reference")
    with pytest.raises(TypeError, match="gated MLP"):
        MoELoRAMLP(torch.nn.Linear(2, 2), 2, 2, 2.0)
    layer = make_mlp("eager")
    layer.context.set(Routing(torch.zeros(3, 4, 1, dtype=torch.long), torch.ones(3, 4, 1)))
    with pytest.raises(ValueError, match="does not fit the MLP input"):
        layer(torch.randn(2, 5, 32))


def test_ffn_experts_checkpoint_round_trip(tmp_path):
    moe = DyLoRA_MoE(tiny_llama(), num_experts=2, lora_r=R, lora_alpha=ALPHA, mixture="ffn", kernel="eager").eval()
    for layer in moe.handle.layers.values():
        with torch.no_grad():
            layer.lora_B.normal_()
    moe.save_pretrained(tmp_path / "ckpt")
    loaded = DyLoRA_MoE.from_pretrained(tiny_llama(), tmp_path / "ckpt").eval()
    assert loaded.moe_config.mixture == "ffn"
    input_ids, mask, _ = batch()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids, mask).logits, moe(input_ids, mask).logits)
