"""Files of the original DyLoRA-MoE (torch.save dicts) load into ours with weights_only=True only; ours stay
safetensors. The files are written here the way the original wrote them: torch.save of plain dicts."""

import collections

import pytest
import torch
from moe_models import batch, tiny_llama

from dylora_moe import DyLoRA_MoE, DynamicHybridRouter, SkillLibrary, load_lora_experts
from dylora_moe.io.original_files import is_safetensors_file
from dylora_moe.utils import load_dylo_moe_state
from tolerances import assert_close

EXECUTED = []


class Payload:
    """Unpickling this would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (EXECUTED.append, ("unpickled",))


def original_router_file(path, num_experts=3, input_size=8, top_k=2, temperature=2.0, maturity=1.0):
    gate = torch.nn.Linear(input_size, num_experts)
    torch.save(
        {
            "gate_state_dict": collections.OrderedDict(gate.state_dict()),
            "expert_maturity": torch.full((num_experts,), maturity),
            "num_experts": num_experts,
            "input_size": input_size,
            "top_k": top_k,
            "temperature": temperature,
        },
        path,
    )
    return gate


def test_original_router_file_loads_with_the_original_semantics(tmp_path):
    gate = original_router_file(tmp_path / "router.pt")
    assert not is_safetensors_file(tmp_path / "router.pt")
    router = DynamicHybridRouter.load(tmp_path / "router.pt")
    assert (router.num_experts, router.input_size, router.top_k, router.temperature) == (3, 8, 2, 2.0)
    assert router.weighting == "original" and router.expert_maturity.tolist() == [1.0, 1.0, 1.0]
    x = torch.randn(5, 8)
    with torch.no_grad():
        logits = gate(x)
    top, idx = logits.topk(2, dim=-1)
    expected = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))  # the original's forward
    assert_close(router(x), expected, torch.float32)

    router.save(tmp_path / "ours.pt")  # our format, whatever the file is called
    assert is_safetensors_file(tmp_path / "ours.pt")
    assert DynamicHybridRouter.load(tmp_path / "ours.pt").config() == router.config()
    router.save(tmp_path / "for_the_original.pt", original_format=True)
    state = torch.load(tmp_path / "for_the_original.pt", weights_only=True)
    assert sorted(state) == sorted(["gate_state_dict", "expert_maturity", "num_experts", "input_size", "top_k",
                                    "temperature"])  # fmt: skip
    assert torch.equal(state["gate_state_dict"]["weight"], gate.weight)


def test_bad_router_files_are_refused_naming_the_file(tmp_path):
    torch.save({"gate_state_dict": Payload(), "num_experts": 2}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt could not be read .*weights_only=True"):
        DynamicHybridRouter.load(tmp_path / "evil.pt")
    assert EXECUTED == []  # nothing was unpickled
    torch.save({"num_experts": 2}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial\.pt is not a DynamicHybridRouter .*missing \['gate_state_dict'"):
        DynamicHybridRouter.load(tmp_path / "partial.pt")
    original_router_file(tmp_path / "r.pt")
    state = torch.load(tmp_path / "r.pt", weights_only=True)
    state["num_experts"] = 4
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match=r"mismatch\.pt: gate weight \(3, 8\)"):
        DynamicHybridRouter.load(tmp_path / "mismatch.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a file of any kind")
    with pytest.raises(ValueError, match="garbage.pt could not be read"):
        DynamicHybridRouter.load(tmp_path / "garbage.pt")


def test_original_skill_library_file(tmp_path):
    skills = {0: torch.randn(6), 3: torch.randn(6)}
    torch.save(skills, tmp_path / "skill_library.pt")
    library = SkillLibrary.load(tmp_path / "skill_library.pt", 6)
    assert list(library.skill_embeddings) == [0, 3]
    assert torch.equal(library.get_all_skills(), torch.stack([skills[0], skills[3]]))
    library.save(tmp_path / "ours.safetensors")
    assert torch.equal(SkillLibrary.load(tmp_path / "ours.safetensors", 6).get_all_skills(), library.get_all_skills())
    with pytest.raises(ValueError, match="not a skill library of 5-value"):
        SkillLibrary.load(tmp_path / "skill_library.pt", 5)
    torch.save({0: Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        SkillLibrary.load(tmp_path / "evil.pt", 6)
    assert EXECUTED == []


def test_original_state_directory(tmp_path):
    moe = DyLoRA_MoE(tiny_llama(layers=1), num_experts=3, lora_r=4, lora_alpha=8, kernel="eager")
    gate = original_router_file(tmp_path / "router.pt", num_experts=3, input_size=32, top_k=1)
    torch.save({2: torch.randn(32)}, tmp_path / "skill_library.pt")
    load_dylo_moe_state(moe, tmp_path)
    assert torch.equal(moe.router.gate.weight, gate.weight) and list(moe.skill_library.skill_embeddings) == [2]


def original_expert_files(directory, r=4, alpha=8, num_experts=2):
    """What the original's save_lora_experts wrote: per expert, torch.save of the peft model's named parameters of
    that adapter (keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.expert_0.weight)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(tiny_llama(layers=1), config, adapter_name="expert_0")
    for i in range(1, num_experts):
        peft_model.add_adapter(f"expert_{i}", config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    directory.mkdir(exist_ok=True)
    for i in range(num_experts):
        weights = {n: p.detach().clone() for n, p in peft_model.named_parameters() if f".expert_{i}." in n}
        torch.save(weights, directory / f"expert_{i}.pt")
    return peft_model


@torch.no_grad()
def test_original_expert_files_map_onto_the_stacked_weights(tmp_path):
    peft_model = original_expert_files(tmp_path).eval()
    moe = DyLoRA_MoE(tiny_llama(layers=1), num_experts=2, lora_r=4, lora_alpha=8, lora_dropout=0.0, kernel="eager")
    load_lora_experts(moe, tmp_path)
    input_ids = batch()[0]
    for i in range(2):
        peft_model.set_adapter(f"expert_{i}")
        moe.expert_manager.set_active_expert(i)
        assert_close(moe.foundation_model(input_ids).logits, peft_model(input_ids).logits, torch.float32)
    assert not torch.equal(moe.handle.layers["model.layers.0.self_attn.q_proj"].lora_B[0],
                           moe.handle.layers["model.layers.0.self_attn.q_proj"].lora_B[1])  # fmt: skip


def test_expert_files_errors_leave_the_model_unchanged(tmp_path):
    original_expert_files(tmp_path, num_experts=3)
    moe = DyLoRA_MoE(tiny_llama(layers=1), num_experts=2, lora_r=4, lora_alpha=8, kernel="eager")
    before = {k: v.clone() for k, v in moe.state_dict().items() if "lora_" in k}

    def unchanged():
        return all(torch.equal(moe.state_dict()[k], v) for k, v in before.items())

    with pytest.raises(FileNotFoundError, match=r"files for experts the model does not have: \['expert_2.pt'\]"):
        load_lora_experts(moe, tmp_path)
    assert unchanged()
    (tmp_path / "expert_2.pt").unlink()
    weights = torch.load(tmp_path / "expert_1.pt", weights_only=True)
    torch.save({k.replace("expert_1", "expert_0"): v for k, v in weights.items()}, tmp_path / "expert_1.pt")
    with pytest.raises(KeyError, match=r"expert_1\.pt: keys of another adapter than expert_1"):
        load_lora_experts(moe, tmp_path)  # expert_0 is valid, but nothing is applied
    assert unchanged()
    torch.save({}, tmp_path / "expert_1.pt")
    with pytest.raises(ValueError, match=r"expert_1\.pt holds no weights"):
        load_lora_experts(moe, tmp_path)
    torch.save({k: v[:2] if "lora_A" in k else v for k, v in weights.items()}, tmp_path / "expert_1.pt")
    with pytest.raises(ValueError, match=r"lora_A of expert 1 is \(2, 32\), expected \(4, 32\)"):
        load_lora_experts(moe, tmp_path)
    assert unchanged()
    (tmp_path / "expert_1.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights file for experts \[1\]"):
        load_lora_experts(moe, tmp_path)
    with pytest.warns(UserWarning, match=r"no weights file for experts \[1\]"):
        load_lora_experts(moe, tmp_path, strict=False)  # the original's behaviour: skip with a warning
    assert not unchanged()  # expert 0 was loaded
