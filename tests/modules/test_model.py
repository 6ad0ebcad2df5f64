"""DyLoRA_MoE: backends agree on identical weights, the original's semantics hold, and training reaches every
expert and the gate. Tiny Llama and GPT-2 (Conv1D) models built from configs; the triton backend runs in Triton's
interpreter on the CPU, so its cases stay 1-layer and a few tokens long."""

import copy

import pytest
import torch
from helpers import DEVICE, HAS_CUDA
from moe_models import BUILDERS, batch, randomize_experts, tiny_llama

from dylora_moe import DyLoRA_MoE, Routing
from tolerances import CPU_DTYPES, GPU_DTYPES, assert_close

CASES = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2)]  # (E, k): plain LoRA, top-1, dense k = E, sparse top-k


def build(arch="llama", num_experts=2, top_k=1, routing="sequence", layers=1, dtype=torch.float32, device="cpu", **kw):
    kw.setdefault("lora_dropout", 0.0)
    moe = DyLoRA_MoE(
        BUILDERS[arch](layers=layers).to(device, dtype), num_experts=num_experts, lora_r=4, lora_alpha=8,
        kernel="eager", routing=routing, top_k=top_k, **kw,
    )  # fmt: skip
    randomize_experts(moe.handle.layers.values())
    return moe


def run(moe, backend, inputs):
    """Logits, loss and the gradients of every trainable parameter after one forward/backward on ``backend``."""
    moe.set_kernel(backend)
    moe.zero_grad(set_to_none=True)
    out = moe(*inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("num_experts, top_k", CASES)
@pytest.mark.parametrize("routing", ["sequence", "token"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_backends_agree(arch, routing, num_experts, top_k, backend):
    """Logits, loss (LM + balance) and gradients of A, B and the gate equal eager's, with padding in the batch."""
    moe = build(arch, num_experts, top_k, routing, device=DEVICE).train()
    inputs = [t.to(DEVICE) for t in batch(rows=3, length=6)]
    want, want_grads = run(moe, "eager", inputs)
    got, got_grads = run(moe, backend, inputs)
    assert_close(got.logits, want.logits, torch.float32, msg="logits")
    assert_close(got.loss, want.loss, torch.float32, msg="loss")
    lora = {n for n, p in moe.named_parameters() if "lora_" in n}
    assert set(got_grads) == set(want_grads) and lora <= set(want_grads)  # E = 1: the gate has no gradient
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], torch.float32, msg=f"grad of {name}")
    if num_experts > 1:
        assert want_grads["router.gate.weight"].abs().max() > 0


@pytest.mark.parametrize("backend", ["eager", "reference", "triton"])
@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_later_forwards_with_other_shapes(routing, backend):
    """Forwards with a new batch size and length, then the same shape again, each equal a fresh eager model's first
    forward on that batch: no routing or shape from the previous batch leaks in (the reference once applied the
    previous batch's token routing in its routing pass: a shape error, or silently wrong routing when the shapes
    matched)."""
    moe = build(num_experts=4, top_k=2, routing=routing, device=DEVICE).train()
    shapes = [(4, 7, 1), (3, 5, 2), (3, 5, 3)]  # (rows, length, seed)
    batches = [[t.to(DEVICE) for t in batch(rows, length, seed)] for rows, length, seed in shapes]
    wants = [run(copy.deepcopy(moe), "eager", inputs) for inputs in batches]
    for inputs, (want, want_grads) in zip(batches, wants):
        got, got_grads = run(moe, backend, inputs)
        assert_close(got.logits, want.logits, torch.float32, msg="logits")
        assert_close(got.loss, want.loss, torch.float32, msg="loss")
        assert set(got_grads) == set(want_grads)
        for name in want_grads:
            assert_close(got_grads[name], want_grads[name], torch.float32, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("routing", ["sequence", "token"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [d for d in (GPU_DTYPES if HAS_CUDA else CPU_DTYPES) if d != torch.float32])
def test_backends_agree_in_half_precision(dtype, arch, routing, backend):
    """The whole model in fp16 (bf16 too on a GPU; the interpreter cannot do bf16 math): same checks, dtype table."""
    moe = build(arch, 4, 2, routing, dtype=dtype, device=DEVICE).train()
    inputs = [t.to(DEVICE) for t in batch(rows=3, length=6)]
    want, want_grads = run(moe, "eager", inputs)
    got, got_grads = run(moe, backend, inputs)
    assert got.logits.dtype == dtype
    assert_close(got.logits, want.logits, dtype, msg="logits")
    assert_close(got.loss, want.loss, dtype, msg="loss")
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], dtype, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", ["eager", "reference", "triton"])
@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_fresh_model_equals_base_model(routing, backend):
    device = DEVICE if backend == "triton" else "cpu"
    base = tiny_llama(layers=1).to(device)
    moe = DyLoRA_MoE(
        tiny_llama(layers=1).to(device), num_experts=2, lora_r=4, lora_alpha=8, kernel=backend, routing=routing
    )
    input_ids, mask, _ = (t.to(device) for t in batch())
    with torch.no_grad():
        got, want = moe(input_ids, mask).logits, base(input_ids, attention_mask=mask).logits
    if routing == "token":
        assert torch.equal(got, want)
    else:  # the mixture sum_e w_e * logits with sum_e w_e = 1 up to one rounding
        assert_close(got, want, torch.float32)


def per_expert_logits(moe, input_ids, mask):
    out = []
    for e in range(moe.num_experts):
        moe.expert_manager.set_active_expert(e)
        out.append(moe.foundation_model(input_ids, attention_mask=mask).logits)
    return torch.stack(out, 1)  # [B, E, S, V]


@torch.no_grad()
def test_sequence_routing_is_the_original_mixture_over_real_tokens():
    """logits[b] = sum_e w[b,e] logits_e[b], w = mean over REAL tokens of the router's weights on the base model's
    last hidden states; padding values change nothing on real positions."""
    moe = build(num_experts=3, top_k=2, routing="sequence", layers=2).eval()
    input_ids, mask, labels = batch()
    out = moe(input_ids, mask, labels)
    with moe.handle.adapters_disabled():  # the routing pass sees the base model
        hidden = moe.foundation_model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    probs = torch.softmax(moe.router.gate(hidden) / moe.router.temperature, dim=-1)
    top, idx = probs.topk(2, dim=-1)
    token_w = torch.zeros_like(probs).scatter(-1, idx, top)  # default weighting: tempered probabilities, no renorm
    seq_w = (token_w * mask[..., None]).sum(1)
    seq_w = seq_w / seq_w.sum(-1, keepdim=True)  # the mean over real tokens, normalised to sum to 1
    assert_close(out.sequence_weights, seq_w, torch.float32)
    expected = torch.einsum("be,besv->bsv", seq_w, per_expert_logits(moe, input_ids, mask))
    assert_close(out.logits, expected, torch.float32)
    shifted = torch.nn.functional.cross_entropy(expected[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1))
    assert_close(out.loss, shifted, torch.float32)
    other = input_ids.clone()
    other[1, 4:] = 7  # different padding tokens
    again = moe(other, mask, labels)
    assert_close(again.logits[mask.bool()], out.logits[mask.bool()], torch.float32)
    assert_close(again.loss, out.loss, torch.float32)


@torch.no_grad()
def test_sequence_top_k_keeps_each_sequences_best_expert():
    moe = build(num_experts=3, top_k=3, routing="sequence", sequence_top_k=1, layers=2).eval()
    input_ids, mask, _ = batch()
    out = moe(input_ids, mask)
    best = out.sequence_weights.argmax(-1)
    assert torch.equal(out.sequence_weights, torch.nn.functional.one_hot(best, 3).float())
    expected = per_expert_logits(moe, input_ids, mask)[torch.arange(3), best]
    assert_close(out.logits, expected, torch.float32)


@torch.no_grad()
def test_token_routing_mixes_topk_experts_per_token():
    """Compared with a hand-built per-token routing through the injection handle (weights recomputed here)."""
    moe = build(num_experts=4, top_k=2, routing="token", layers=2, router_weighting="original").eval()
    input_ids, mask, _ = batch()
    out = moe(input_ids, mask)
    with moe.handle.adapters_disabled():  # the routing pass sees the base model
        hidden = moe.foundation_model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    top, idx = moe.router.gate(hidden).topk(2, dim=-1)
    weights = torch.softmax(top, dim=-1) * mask[..., None]  # original weighting; padding tokens get weight 0
    moe.handle.set_routing(idx, weights)
    assert_close(out.logits, moe.foundation_model(input_ids, attention_mask=mask).logits, torch.float32)


@pytest.mark.parametrize("routing", ["sequence", "token"])
@pytest.mark.parametrize("weighting, trains", [("softmax", True), ("original", False)])
def test_gate_gradient_with_k1(routing, weighting, trains):
    """k = 1: the tempered-probability weighting trains the gate through the LM loss; the original's weight is the
    constant 1.0, so its gate gradient is exactly zero (a defect of the original, docs/design.md §2)."""
    moe = build(num_experts=3, top_k=1, routing=routing, router_weighting=weighting, balance_coefficient=0.0).train()
    out = moe(*batch())
    out.loss.backward()
    grad = moe.router.gate.weight.grad
    assert (grad.abs().max() > 1e-6) if trains else (grad is None or torch.count_nonzero(grad) == 0)


@pytest.mark.parametrize("backend", ["eager", "reference", "triton"])
@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_every_expert_and_the_gate_train(routing, backend):
    """One AdamW step on a batch whose routing reaches every expert changes every expert's A and B and the gate
    (the original code on current peft changes none of its LoRA weights, docs/design.md §2)."""
    device = DEVICE if backend == "triton" else "cpu"
    moe = build(num_experts=3, top_k=2, routing=routing, lora_dropout=0.05, device=device).train()
    moe.set_kernel(backend)
    optimizer = torch.optim.AdamW(moe.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {
        id(p) for n, p in moe.named_parameters() if "lora_" in n or n.startswith("router.gate")
    }
    before = {n: p.detach().clone() for n, p in moe.named_parameters() if p.requires_grad}
    out = moe(*(t.to(device) for t in batch(rows=4)))
    assert (out.expert_token_fraction > 0).all(), "the batch must reach every expert"
    out.loss.backward()
    optimizer.step()
    params = dict(moe.named_parameters())
    for name, old in before.items():
        if "lora_" in name:
            changed = (params[name].detach() != old).flatten(1).any(1)
            assert changed.all(), f"{name}: experts {(~changed).nonzero().flatten().tolist()} did not change"
        else:
            assert not torch.equal(params[name].detach(), old), f"{name} did not change"


def test_output_statistics_and_aux_loss():
    moe = build(num_experts=4, top_k=2, routing="token", balance_loss="switch", z_loss_coefficient=1e-3)
    inputs = batch()
    moe.train()
    out = moe(*inputs)
    assert_close(out.loss, out.lm_loss + 0.01 * out.balance_loss + 1e-3 * out.z_loss, torch.float32)
    assert_close(out.aux_loss, 0.01 * out.balance_loss + 1e-3 * out.z_loss, torch.float32)
    assert out.expert_utilization.shape == (4,) and out.expert_token_fraction.shape == (4,)
    assert_close(out.expert_token_fraction.sum(), torch.tensor(1.0), torch.float32)
    assert 0 <= out.router_entropy <= torch.log(torch.tensor(4.0))
    with torch.no_grad(), moe.handle.adapters_disabled():  # statistics over the real tokens only
        hidden = moe.foundation_model.base_model(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state
        route = moe.router.route(hidden[inputs[1].bool()])
    assert_close(out.expert_token_fraction, route.counts / route.counts.sum(), torch.float32)
    assert_close(out.expert_utilization, route.dense.mean(0), torch.float32)
    moe.eval()
    with torch.no_grad():
        assert torch.equal(moe(*inputs).loss, moe(*inputs).lm_loss)  # no auxiliary loss outside training


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_activation_checkpointing_gives_the_same_gradients(routing):
    """Recomputed layer forwards run after the model's forward returned: they must see the same routing."""
    moe = build(num_experts=3, top_k=2, routing=routing, layers=2).train()
    inputs = batch()
    _, want = run(moe, "eager", inputs)
    moe.gradient_checkpointing_enable()
    base = moe.foundation_model
    enabled = getattr(base, "is_activation_checkpointing", None)  # transformers < 5.2x: is_gradient_checkpointing
    assert enabled if enabled is not None else base.is_gradient_checkpointing
    _, got = run(moe, "eager", inputs)
    for name in want:
        assert_close(got[name], want[name], torch.float32, msg=name)


def test_growth_adds_an_expert_everywhere_and_keeps_old_ones():
    moe = build(num_experts=2, top_k=1, layers=2).eval()
    input_ids, mask, _ = batch()
    with torch.no_grad():
        before = per_expert_logits(moe, input_ids, mask)
        assert moe.add_new_skill(force=True)
        assert moe.num_experts == 3 and moe.router.num_experts == 3
        assert all(layer.num_experts == 3 for layer in moe.handle.layers.values())
        assert moe.router.expert_maturity.tolist() == [1, 1, 0]  # new expert: dense routing until marked mature
        after = per_expert_logits(moe, input_ids, mask)
        assert_close(after[:, :2], before, torch.float32)
        moe(input_ids, mask)
        moe.set_kernel("reference")  # the reference rebuilds its peft adapters for the new expert
        moe(input_ids, mask)
    grower = build(num_experts=1, layers=1, allow_expert_growth=False)
    assert not grower.add_new_skill(input_ids)
    grower.allow_expert_growth = True
    assert grower.add_new_skill(input_ids) and grower.num_experts == 2  # empty skill library: novel
    assert not grower.add_new_skill(input_ids)  # the same data is no longer novel


@torch.no_grad()
def test_generate_routes_then_decodes():
    moe = build(num_experts=3, top_k=3, sequence_top_k=1, layers=2).eval()
    input_ids, mask, _ = batch(rows=2, length=5)
    mask[1] = 1
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = moe.generate(input_ids, attention_mask=mask, **gen)
    best = moe(input_ids, mask).sequence_weights.argmax(-1)
    assert out.shape == (2, 5 + 4) and torch.equal(out[:, :5], input_ids)
    with moe.handle.context.routed(Routing.per_row(best)):  # each row decoded by its top expert alone
        expected = moe.foundation_model.generate(input_ids=input_ids, attention_mask=mask, **gen)
    assert torch.equal(out, expected)
    with moe.handle.adapters_disabled():  # and the experts do change the text (the test can fail)
        assert not torch.equal(out, moe.foundation_model.generate(input_ids=input_ids, attention_mask=mask, **gen))


def test_model_name_as_local_path(tmp_path):
    tiny_llama(layers=1).save_pretrained(tmp_path / "base")
    moe = DyLoRA_MoE(str(tmp_path / "base"), num_experts=2, lora_r=4, kernel="eager")
    assert moe.num_experts == 2 and len(moe.handle.layers) == 4


def test_bad_input():
    base = tiny_llama(layers=1)
    for kwargs, pattern in [
        ({"num_experts": 2, "top_k": 3}, "top_k"),
        ({"num_experts": 2, "top_k": 0}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"routing": "batch"}, "unknown routing"),
        ({"kernel": "cuda"}, "unknown kernel"),
        ({"balance_loss": "l1"}, "unknown balance_loss"),
        ({"num_experts": 2, "sequence_top_k": 3}, "sequence_top_k"),
        ({"target_modules": ["qkv"]}, "no target module among"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            DyLoRA_MoE(base, **kwargs)
    with pytest.raises(TypeError, match="model_name"):
        DyLoRA_MoE(42)
    moe = DyLoRA_MoE(tiny_llama(layers=1), num_experts=2, lora_r=4, kernel="eager")
    with pytest.raises(ValueError, match="unknown kernel"):
        moe.set_kernel("fast")
    with pytest.raises(ValueError, match="lora_dropout=0.5 differs"):
        moe.expert_manager.create_expert(lora_dropout=0.5)
    with pytest.raises(IndexError, match="does not exist"):
        moe.expert_manager.set_active_expert(2)


@pytest.mark.parametrize("head", ["bias", "softcap"])
def test_sequence_mixture_with_other_output_heads(head):
    """A head with a bias (counted once per unit of weight) and a soft-capped head (not linear: per-pair logits,
    one at a time) still give the reference's mixture of E full logit tensors."""
    moe = build(num_experts=3, top_k=2, routing="sequence", sequence_top_k=2).train()
    if head == "bias":
        lm_head = moe.foundation_model.lm_head
        moe.foundation_model.lm_head = torch.nn.Linear(32, 100, bias=True).requires_grad_(False)
        moe.foundation_model.lm_head.weight.data.copy_(lm_head.weight)
        moe.foundation_model.lm_head.bias.data.normal_()
    else:
        moe.foundation_model.config.final_logit_softcapping = 0.5
    inputs = batch()
    want, want_grads = run(moe, "reference", inputs)
    got, got_grads = run(moe, "eager", inputs)
    assert_close(got.logits, want.logits, torch.float32)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], torch.float32, msg=name)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU error; a GPU runs the triton kernel natively")
def test_triton_without_gpu_or_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        DyLoRA_MoE(tiny_llama(layers=1), num_experts=2, lora_r=4, kernel="triton")


@pytest.fixture
def cpu_model_on_a_gpu_machine(monkeypatch):
    """CUDA available as far as "auto" can tell, and no Triton interpreter: a Triton kernel on CPU tensors raises."""
    import dylora_moe.modules.layer as layer_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # Layers that resolve "auto" once per process (lru_cache) must not keep the pretend answer after the test.
    clear = getattr(getattr(layer_module, "_auto_backend", None), "cache_clear", lambda: None)
    clear()
    yield
    clear()


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_auto_kernel_on_a_cpu_model_of_a_gpu_machine_builds(cpu_model_on_a_gpu_machine, routing):
    """kernel="auto" with CUDA available and the model still on the CPU (the usual load order): construction and
    set_kernel do not raise (they once resolved "auto" to triton from torch.cuda.is_available() and failed), and
    the router resolves its backend from the logits' device at each call."""
    moe = DyLoRA_MoE(tiny_llama(layers=1), num_experts=2, lora_r=4, kernel="auto", routing=routing)
    moe.set_kernel("eager")
    moe.set_kernel("auto")
    assert moe.kernel == "auto" and moe.router.backend == "auto"
    route = moe.router.route(torch.randn(3, moe.router.input_size))  # CPU logits: the eager router op
    assert route.ids.shape == (3, 1)


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_auto_kernel_on_a_cpu_model_of_a_gpu_machine_runs_eager(cpu_model_on_a_gpu_machine, routing):
    """The forward of such a model resolves "auto" from the CPU tensors: eager's results bit for bit."""
    moe = build(num_experts=3, top_k=2, routing=routing).train()
    inputs = batch(rows=3, length=6)
    want, want_grads = run(moe, "eager", inputs)
    got, got_grads = run(moe, "auto", inputs)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
    for name in want_grads:
        assert torch.equal(got_grads[name], want_grads[name]), name


ROUTING_MODES = [
    pytest.param("sequence", {}, id="sequence"),
    pytest.param("sequence", {"sequence_top_k": 1}, id="sequence-top1"),
    pytest.param("token", {}, id="token"),
]


@pytest.mark.parametrize("backend", ["eager", "reference", "triton"])
@pytest.mark.parametrize("routing, kw", ROUTING_MODES)
@pytest.mark.parametrize("num_experts", [1, 3])
def test_all_padding_batch_has_a_defined_result(num_experts, routing, kw, backend):
    """A batch with no real token: finite logits, loss 0 (no label counts), aux losses 0, a backward that runs and
    gives zero LoRA gradients. (Sequence routing once crashed inside the HF model with a reshape error.)"""
    moe = build(num_experts=num_experts, top_k=1, routing=routing, device=DEVICE, balance_loss="mse", **kw).train()
    moe.set_kernel(backend)
    input_ids = torch.zeros(2, 5, dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(input_ids)
    out = moe(input_ids, mask, input_ids.masked_fill(mask == 0, -100))
    assert out.logits.shape == (2, 5, 100) and torch.isfinite(out.logits).all()
    assert out.loss.item() == 0.0 and out.lm_loss.item() == 0.0
    out.loss.backward()
    for name, p in moe.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
            if "lora_" in name:
                assert p.grad.abs().max() == 0, name
    if num_experts > 1:
        assert out.balance_loss.item() == 0.0 and out.z_loss.item() == 0.0


@pytest.mark.parametrize("backend", ["eager", "reference", "triton"])
@pytest.mark.parametrize("routing, kw", ROUTING_MODES)
def test_all_padding_row_changes_nothing_for_the_other_rows(routing, kw, backend):
    """An all-padding row inside a batch: the other rows' logits, the loss (LM + aux) and every gradient equal
    those of the batch without it."""
    moe = build(num_experts=3, top_k=2, routing=routing, device=DEVICE, z_loss_coefficient=1e-2, **kw).train()
    input_ids, mask, labels = (t.to(DEVICE) for t in batch(rows=3, length=6))
    with_pad = [torch.cat([t, torch.full_like(t[:1], fill)]) for t, fill in ((input_ids, 0), (mask, 0), (labels, -100))]
    want, want_grads = run(moe, backend, [input_ids, mask, labels])
    got, got_grads = run(moe, backend, with_pad)
    assert torch.isfinite(got.logits).all()
    assert_close(got.logits[:3], want.logits, torch.float32, msg="logits")
    assert_close(got.loss, want.loss, torch.float32, msg="loss")
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], torch.float32, msg=f"grad of {name}")


def test_routing_decisions_live_in_the_routing_module():
    """decide_routing / sequence_weights / sequence_pairs / token_routing / RoutingDecision are in
    dylora_moe.modules.routing (the model keeps thin methods and the old import path); routing.py imports neither the
    model nor the router at run time (no import cycle: layers import it)."""
    import ast

    from dylora_moe import model as model_module
    from dylora_moe.modules import routing

    assert model_module.RoutingDecision is routing.RoutingDecision
    tree = ast.parse(open(routing.__file__).read())
    runtime_imports = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}  # not TYPE_CHECKING's
    assert not runtime_imports & {"model", "router"}, runtime_imports

    weights = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 0.0], [0.2, 0.0, 0.8]])
    rows, experts, w = routing.sequence_pairs(weights, sequence_top_k=2)  # static: B * k pairs, zeros included
    assert rows.tolist() == [0, 0, 1, 1, 2, 2] and experts.tolist()[:2] == [0, 1] and experts.tolist()[4:] == [2, 0]
    assert torch.equal(w, weights[rows, experts])
    rows, experts, w = routing.sequence_pairs(weights, sequence_top_k=None)  # the non-zero pairs
    assert rows.tolist() == [0, 0, 2, 2] and experts.tolist() == [0, 1, 0, 2]


def test_sequence_mixture_sums_repeated_rows_in_a_fixed_order():
    """The (sequence, expert) pairs of one row are summed by a matmul with the mixing matrix (no index_add, whose
    repeated rows use atomics on CUDA): equal to the float64 sum, a row without pairs mixes to 0, and the bias
    count is the row's total weight."""
    moe = build(routing="sequence", num_experts=3)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(5, 4, 32, generator=gen)
    rows = torch.tensor([0, 0, 0, 2, 2])  # row 1 has no pair; rows 0 and 2 repeat
    weights = torch.rand(5, generator=gen)
    got = moe._mixed_hidden(hidden, rows, weights, batch=3)
    want = torch.zeros(3, 4, 32, dtype=torch.float64)
    for n in range(5):
        want[rows[n]] += weights[n].double() * hidden[n].double()
    assert_close(got.hidden, want.float(), torch.float32)
    assert torch.equal(got.hidden[1], torch.zeros(4, 32))
    torch.testing.assert_close(
        got.bias_scale, torch.stack([weights[:3].sum(), weights.new_zeros(()), weights[3:].sum()])
    )
