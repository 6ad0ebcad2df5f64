"""DyLoRAMoEConfig: validation, serialisation, DyLoRA_MoE(config=), consistent defaults, the original() preset
against the original's formula (docs/design.md §2), and from_pretrained in peft's argument order."""

import inspect
import json
import warnings

import pytest
import torch
from moe_models import batch, randomize_experts, tiny_llama

from dylora_moe import DyLoRA_MoE, DyLoRAMoEConfig, DynamicHybridRouter
from tolerances import assert_close


def test_defaults_agree_between_model_config_and_router():
    router = {p.name: p.default for p in inspect.signature(DynamicHybridRouter).parameters.values()}
    cfg = DyLoRAMoEConfig()
    assert (router["top_k"], router["temperature"]) == (cfg.top_k, cfg.temperature)
    assert (router["weighting"], router["renormalize"]) == (cfg.router_weighting, cfg.renormalize) == ("softmax", False)
    moe = DyLoRA_MoE(tiny_llama(layers=1), kernel="eager")
    assert moe.moe_config == DyLoRAMoEConfig(target_modules=list(moe.handle.layers), kernel="eager")
    assert (moe.num_experts, moe.lora_r, moe.lora_alpha, moe.lora_dropout) == (1, 16, 32, 0.05)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"num_experts": 0}, "num_experts must be an int >= 1"),
        ({"num_experts": 2.0}, "num_experts must be an int"),
        ({"lora_r": 0}, "lora_r"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"target_modules": "q_proj"}, "target_modules must be None or a list"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"mixture": "attention"}, "unknown mixture"),
        ({"num_experts": 2, "expert_ranks": [4]}, "expert_ranks must be None or 2 values"),
        ({"num_experts": 2, "expert_alphas": [4, 0]}, "expert_alphas"),
        ({"growth_rank": "double"}, "growth_rank"),
        ({"kernel": "cuda"}, "unknown kernel"),
        ({"routing": "batch"}, "unknown routing"),
        ({"num_experts": 2, "top_k": 3}, r"top_k must be an int in \[1, num_experts=2\]"),
        ({"temperature": 0}, "temperature"),
        ({"router_weighting": "gumbel"}, "unknown router_weighting"),
        ({"num_experts": 2, "sequence_top_k": 3}, "sequence_top_k"),
        ({"renormalize": 1}, "renormalize must be a bool"),
        ({"balance_loss": "l1"}, "unknown balance_loss"),
        ({"balance_coefficient": float("nan")}, "balance_coefficient"),
        ({"balance_update_rate": -0.001}, "balance_update_rate"),
        ({"global_balance": 1}, "global_balance must be a bool"),
        ({"z_loss_coefficient": -1.0}, "z_loss_coefficient"),
        ({"num_experts": 4, "top_k": 2, "routing": "token", "mixture": "ffn"}, "sum to 1 per token"),
        # Issue 24: settings that overflow the router or the experts, and a setting token routing would ignore.
        ({"temperature": 1e-39}, r"temperature must be a finite number in \[0.001, 1000\].*got 1e-39"),
        ({"temperature": 1e300}, "temperature must be"),
        ({"lora_alpha": 1e300}, r"lora_alpha must be a finite number in \(0, 10000\]"),
        ({"num_experts": 2, "expert_alphas": [8, 1e300]}, "expert_alphas"),
        ({"num_experts": 2, "routing": "token", "sequence_top_k": 1}, r"sequence_top_k=1 applies to routing='seq"),
    ],
)
def test_validation_names_the_setting(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DyLoRAMoEConfig(**kwargs)


def test_dict_json_round_trip_and_unknown_keys():
    cfg = DyLoRAMoEConfig(num_experts=3, top_k=2, target_modules=("q_proj", "v_proj"), expert_ranks=[4, 4, 8])
    assert cfg.target_modules == ["q_proj", "v_proj"]  # tuples become lists (JSON round trip stays equal)
    assert DyLoRAMoEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown DyLoRAMoEConfig settings \['topk'\]"):
        DyLoRAMoEConfig.from_dict({**cfg.to_dict(), "topk": 2})
    assert cfg.replace(top_k=3).top_k == 3 and cfg.top_k == 2
    with pytest.raises(ValueError, match="top_k"):
        cfg.replace(top_k=4)


def test_model_takes_config_and_keyword_overrides():
    cfg = DyLoRAMoEConfig(num_experts=3, lora_r=4, lora_alpha=8, routing="token", top_k=2, kernel="eager")
    moe = DyLoRA_MoE(tiny_llama(layers=1), config=cfg, temperature=1.5)
    assert (moe.num_experts, moe.routing, moe.router.top_k, moe.router.temperature) == (3, "token", 2, 1.5)
    assert cfg.temperature == 2.0  # the caller's config is not changed
    assert moe.moe_config == cfg.replace(temperature=1.5, target_modules=list(moe.handle.layers))
    moe.add_new_skill(force=True)
    assert moe.moe_config.num_experts == 4  # the live settings
    rebuilt = DyLoRA_MoE(tiny_llama(layers=1), config=moe.moe_config)
    assert list(rebuilt.handle.layers) == list(moe.handle.layers) and rebuilt.num_experts == 4
    with pytest.raises(TypeError, match="config must be a DyLoRAMoEConfig"):
        DyLoRA_MoE(tiny_llama(layers=1), config={"num_experts": 2})
    with pytest.raises(ValueError, match="top_k"):
        DyLoRA_MoE(tiny_llama(layers=1), config=cfg, num_experts=1)


def design2_sequence_logits(moe, input_ids, top_k, mature):
    """The original's multi-expert forward (docs/design.md §2), written out: router weights per token from the last
    hidden states (dense tempered softmax while an expert is immature, else softmax over the top-k logits), averaged
    over the sequence; one full pass per expert; logits = the weighted sum of the expert logits."""
    with moe.handle.adapters_disabled():
        hidden = moe.foundation_model.model(input_ids).last_hidden_state
    logits = hidden @ moe.router.gate.weight.T + moe.router.gate.bias
    if mature:
        top, idx = logits.topk(top_k, dim=-1)
        token_weights = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))
    else:
        token_weights = torch.softmax(logits / 2.0, dim=-1)
    seq_weights = token_weights.mean(1)  # [B, E]
    mixed = 0
    for e in range(moe.num_experts):
        moe.expert_manager.set_active_expert(e)
        mixed = mixed + seq_weights[:, e, None, None] * moe.foundation_model(input_ids).logits
    return mixed


@pytest.mark.parametrize("top_k, mature", [(1, True), (2, True), (2, False)])
@torch.no_grad()
def test_original_preset_reproduces_design2_formula(top_k, mature):
    cfg = DyLoRAMoEConfig.original(num_experts=3, lora_r=4, lora_alpha=8, top_k=top_k, kernel="eager")
    assert (cfg.routing, cfg.router_weighting, cfg.balance_coefficient, cfg.growth_rank) == (
        "sequence", "original", 0.0, "original",
    )  # fmt: skip
    moe = DyLoRA_MoE(tiny_llama(), config=cfg, mature_experts=mature).eval()
    randomize_experts(moe.handle.layers.values())
    moe.router.gate.weight.normal_()
    input_ids = batch(rows=3, length=7)[0][[0, 2]]  # unpadded rows: the original averaged over every position
    expected = design2_sequence_logits(moe, input_ids, top_k, mature)
    assert_close(moe(input_ids).logits, expected, torch.float32)
    if mature and top_k == 2:  # the default weighting is a different rule: the preset is what makes them equal
        default = DyLoRA_MoE(tiny_llama(), config=cfg.replace(router_weighting="softmax")).eval()
        default.load_state_dict(moe.state_dict())
        assert (default(input_ids).logits - expected).abs().max() > 1e-4


def test_original_preset_loss_is_the_lm_loss_and_token_generation_has_its_balance_loss():
    moe = DyLoRA_MoE(tiny_llama(layers=1), config=DyLoRAMoEConfig.original(num_experts=2, kernel="eager")).train()
    input_ids, mask, labels = batch()
    out = moe(input_ids, mask, labels)
    assert torch.equal(out.loss, out.lm_loss)
    token = DyLoRAMoEConfig.original(routing="token")
    assert (token.routing, token.balance_loss, token.balance_coefficient) == ("token", "mse", 0.01)


def test_from_pretrained_peft_order_and_deprecated_order(tmp_path):
    moe = DyLoRA_MoE(tiny_llama(layers=1), num_experts=2, lora_r=4, lora_alpha=8, kernel="eager").eval()
    randomize_experts(moe.handle.layers.values())
    moe.save_pretrained(tmp_path / "ckpt")
    input_ids, mask, _ = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        loaded = DyLoRA_MoE.from_pretrained(tiny_llama(layers=1), tmp_path / "ckpt", kernel="eager").eval()
    with pytest.warns(DeprecationWarning, match="base model first"):
        old = DyLoRA_MoE.from_pretrained(str(tmp_path / "ckpt"), tiny_llama(layers=1), kernel="eager").eval()
    with torch.no_grad():
        want = moe(input_ids, mask).logits
        assert torch.equal(loaded(input_ids, mask).logits, want) and torch.equal(old(input_ids, mask).logits, want)


def test_every_setting_is_a_model_keyword():
    """DyLoRA_MoE(...) takes each DyLoRAMoEConfig field as a keyword (its value read from the signature's locals)."""
    import dataclasses

    keywords = set(inspect.signature(DyLoRA_MoE).parameters)
    assert {f.name for f in dataclasses.fields(DyLoRAMoEConfig)} <= keywords


def test_config_imports_no_torch():
    """The settings are read by train.py before torch is imported (``--help`` and a bad flag answer at once)."""
    import subprocess
    import sys

    code = "import sys, dylora_moe.config; print('torch' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_backend_is_the_setting_and_kernel_its_former_name(tmp_path):
    assert DyLoRAMoEConfig(kernel="eager").backend == "eager" == DyLoRAMoEConfig(backend="eager").backend
    assert "kernel" not in DyLoRAMoEConfig().to_dict()
    assert DyLoRAMoEConfig.from_dict({"kernel": "eager"}).backend == "eager"  # a checkpoint written before
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        DyLoRAMoEConfig(backend="cuda")
    moe = DyLoRA_MoE(tiny_llama(layers=1), num_experts=2, backend="eager")
    assert moe.backend == moe.kernel == moe.moe_config.backend == "eager"
    moe.set_backend("auto")
    assert moe.backend == "auto" and moe.router.backend == "auto"
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        moe.set_backend("fast")
    moe.save_pretrained(tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "dylora_moe_config.json"
    saved = json.loads(config_file.read_text())
    assert saved["backend"] == "auto" and "kernel" not in saved
    reloaded = DyLoRA_MoE.from_pretrained(tiny_llama(layers=1), tmp_path / "ckpt", kernel="eager")
    assert reloaded.backend == "eager"


def test_model_settings_are_the_config_it_keeps():
    moe = DyLoRA_MoE(tiny_llama(layers=1), num_experts=2, backend="eager")
    moe.balance_coefficient = 0.5
    assert moe.moe_config.balance_coefficient == 0.5
    with pytest.raises(ValueError, match="balance_coefficient must be a finite number >= 0"):
        moe.balance_coefficient = -1.0  # refused by the config's rule; the setting stays
    assert moe.balance_coefficient == 0.5


def test_train_flags_are_the_config_settings():
    """train.py's model flags: DyLoRAMoEConfig's fields, help and rules (a flag error is the config's rule)."""
    import dataclasses

    from dylora_moe.config import RULES
    from dylora_moe.train import args as cli

    flags = {f.name: f for f in dataclasses.fields(cli.ExpertArguments)}
    settings = {f.name: f for f in dataclasses.fields(DyLoRAMoEConfig)}
    for name in cli.FLAG_SETTINGS:
        assert name in settings and name in flags
        if name not in cli.FLAG_HELP:
            assert flags[name].metadata["help"] == settings[name].metadata["help"]
    rules = {name: holds for name, holds, _ in cli.CHECKS if name in RULES}
    assert rules and all(holds is RULES[name][0] for name, holds in rules.items())


def test_reference_is_the_peft_model_backend_and_loop_the_layers_per_expert_loop():
    from dylora_moe import MoELoRALinear
    from dylora_moe.modules.layer import check_kernel

    assert check_kernel("loop") == "loop" == check_kernel("reference")  # a layer's former name for its loop
    layer = MoELoRALinear(torch.nn.Linear(8, 8), 2, 4, 8.0, kernel="reference")
    assert layer.kernel == "loop"
    with pytest.raises(ValueError, match="unknown kernel 'peft'"):
        check_kernel("peft")
    moe = DyLoRA_MoE(tiny_llama(layers=1), num_experts=2, backend="reference")
    assert moe.backend == "reference" and moe.handle.kernel == "loop"  # the forward runs the peft reference
    with pytest.raises(ValueError, match="unknown backend 'loop'"):
        DyLoRAMoEConfig(backend="loop")  # the model has no per-expert-loop backend of its own


def test_the_model_refuses_sequence_top_k_with_token_routing():
    with pytest.raises(ValueError, match=r"sequence_top_k=1 applies to routing='sequence' only"):
        DyLoRA_MoE(tiny_llama(layers=1), num_experts=2, routing="token", sequence_top_k=1, kernel="eager")
