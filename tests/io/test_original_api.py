"""Every public name of the original dylo_moe package, with its signature and behaviour (docs/design.md §2)."""

import importlib
import inspect
import pickle

import pytest
import torch
from moe_models import batch, randomize_experts, tiny_llama

import dylora_moe
from dylora_moe import (
    DyLoRA_MoE,
    DynamicHybridRouter,
    ExpertManager,
    NoveltyDetector,
    SkillLibrary,
    TwoPhaseLRScheduler,
    load_lora_experts,
    print_trainable_parameters,
    save_dylo_moe_state,
    save_lora_experts,
    two_phase_lr_lambda,
)
from dylora_moe.utils import load_dylo_moe_state

ORIGINAL_MODULES = {
    "scheduler": ["TwoPhaseLRScheduler", "two_phase_lr_lambda"],
    "utils": ["print_trainable_parameters", "save_dylo_moe_state", "save_lora_experts", "load_lora_experts"],
    "skill_library": ["SkillLibrary"],
    "novelty_detector": ["NoveltyDetector"],
    "expert": ["ExpertManager"],
    "router": ["DynamicHybridRouter"],
    "model": ["DyLoRA_MoE"],
}


@pytest.mark.parametrize("module", sorted(ORIGINAL_MODULES))
def test_original_names_import_from_the_package_and_the_original_submodules(module):
    mod = importlib.import_module(f"dylora_moe.{module}")
    for name in ORIGINAL_MODULES[module]:
        assert getattr(mod, name) is getattr(dylora_moe, name)
        assert name in dylora_moe.__all__


def params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def test_original_signatures():
    assert [n for n, _ in params(DyLoRA_MoE)][:7] == [
        "model_name", "num_experts", "lora_r", "lora_alpha", "lora_dropout", "token", "allow_expert_growth",
    ]  # fmt: skip
    assert params(DynamicHybridRouter)[:4] == [
        ("input_size", inspect.Parameter.empty), ("num_experts", inspect.Parameter.empty), ("top_k", 1),
        ("temperature", 2.0),
    ]  # fmt: skip
    assert [n for n, _ in params(ExpertManager)][:4] == ["model", "lora_r", "lora_alpha", "lora_dropout"]
    assert params(ExpertManager.create_expert) == [("r", None), ("lora_alpha", None), ("lora_dropout", None)]
    assert [n for n, _ in params(SkillLibrary.add_skill)] == ["skill_id", "skill_embedding"]
    assert params(NoveltyDetector)[:3] == [
        ("skill_library", inspect.Parameter.empty), ("similarity_threshold", 0.75), ("use_median", False),
    ]  # fmt: skip
    assert [n for n, _ in params(TwoPhaseLRScheduler)] == [
        "optimizer", "high_lr", "low_lr", "seeding_steps", "consolidation_steps", "last_epoch",
    ]  # fmt: skip
    assert [n for n, _ in params(two_phase_lr_lambda)] == [
        "current_step", "high_lr", "low_lr", "seeding_steps", "consolidation_steps",
    ]  # fmt: skip
    assert [n for n, _ in params(load_lora_experts)][:2] == ["model", "load_directory"]
    assert [n for n, _ in params(save_lora_experts)] == ["model", "save_directory"]
    assert [n for n, _ in params(save_dylo_moe_state)] == ["model", "save_directory"]


def test_two_phase_schedule_scales_the_initial_lr_and_survives_state_dict_and_pickle():
    assert [two_phase_lr_lambda(s, 1.0, 0.1, 3, 2) for s in range(7)] == [1.0] * 3 + [0.1] * 4
    weight = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([weight], lr=0.5)
    sched = TwoPhaseLRScheduler(opt, high_lr=2.0, low_lr=0.2, seeding_steps=2, consolidation_steps=3)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.1, 0.1])  # factors on the optimizer's lr = 0.5
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
    sched2 = TwoPhaseLRScheduler(opt2, 2.0, 0.2, 2, 3)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == sched.last_epoch
    assert pickle.loads(pickle.dumps(sched)).lr_lambdas[0](0) == 2.0
    with pytest.raises(ValueError, match="seeding_steps"):
        TwoPhaseLRScheduler(opt, 1.0, 0.1, -1, 3)


def test_skill_library_original_order_and_methods():
    lib = SkillLibrary(4)
    assert lib.get_all_skills() is None and lib.skill_embeddings == {}
    lib.add_skill(3, torch.tensor([1.0, 0, 0, 0]))
    lib.add_skill(0, torch.tensor([0.0, 1, 0, 0]))
    assert list(lib.skill_embeddings) == [3, 0]
    assert torch.equal(lib.get_all_skills(), torch.tensor([[1.0, 0, 0, 0], [0.0, 1, 0, 0]]))
    assert lib.closest(torch.tensor([0.1, 2.0, 0, 0]))[0] == 0
    with pytest.warns(DeprecationWarning, match="add_skill"):
        lib.add_skill(torch.tensor([0.0, 0, 1, 0]), 7)  # this package's former order
    assert 7 in lib.skill_embeddings
    with pytest.raises(ValueError, match="expected 4"):
        lib.add_skill(1, torch.zeros(5))
    with pytest.raises(TypeError, match="skill_id"):
        lib.add_skill("a", torch.zeros(4))


def test_novelty_detector_threshold_and_median():
    lib = SkillLibrary(2)
    detector = NoveltyDetector(lib)
    assert detector.similarity_threshold == 0.75 and not detector.use_median
    assert detector.is_novel(torch.tensor([1.0, 0.0]))  # empty library: everything is novel
    lib.add_skill(0, torch.tensor([1.0, 0.0]))
    assert not detector.is_novel(torch.tensor([2.0, 0.1]))  # cos ~ 0.999 >= 0.75
    assert detector.is_novel(torch.tensor([1.0, 1.0]))  # cos ~ 0.707 < 0.75
    samples = torch.tensor([[1.0, 0.0], [3.0, 0.0], [-1.0, 0.0]])  # best similarities 1, 1, -1
    assert NoveltyDetector(lib).is_novel(samples)  # mean 1/3
    assert not NoveltyDetector(lib, use_median=True).is_novel(samples)  # median 1
    with pytest.warns(DeprecationWarning, match="similarity_threshold"):
        assert NoveltyDetector(lib, threshold=0.5).similarity_threshold == 0.5
    with pytest.raises(ValueError, match="similarity_threshold"):
        NoveltyDetector(lib, similarity_threshold=2.0)


def test_print_trainable_parameters(capsys):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == f"trainable params: 3 || all params: 11 || trainable%: {100 * 3 / 11}"


def build(**kwargs):
    settings = dict(num_experts=2, lora_r=4, lora_alpha=8, kernel="eager", top_k=1)
    settings.update(kwargs)
    return DyLoRA_MoE(tiny_llama(layers=1), **settings)


def test_expert_manager_configs_and_current_expert():
    from peft import LoraConfig

    moe = build(num_experts=3)
    manager = moe.expert_manager
    assert manager.current_expert_id == 0  # the original activates expert 0 after creating the experts
    configs = manager.expert_configs
    assert sorted(configs) == [0, 1, 2] and all(isinstance(c, LoraConfig) for c in configs.values())
    assert (configs[1].r, configs[1].lora_alpha, configs[1].lora_dropout) == (4, 8, 0.05)
    assert set(configs[0].target_modules) == set(moe.handle.layers)
    assert manager.create_expert() == 3 and manager.current_expert_id == 0  # creating does not activate
    manager.set_active_expert(2)
    assert manager.current_expert_id == 2
    with pytest.raises(ValueError, match="lora_dropout=0.2 differs from the manager's 0.05"):
        manager.create_expert(lora_dropout=0.2)
    assert manager.num_experts == 4  # the refused expert was not half-created
    assert all(layer.num_experts == 4 for layer in moe.handle.layers.values())


def test_growth_makes_the_new_expert_current_and_uses_the_rank_rule():
    moe = build(num_experts=2)
    assert moe.add_new_skill(force=True) and moe.expert_manager.current_expert_id == 2
    assert moe.growth_rank_for_next_expert() == 4  # default growth_rank="same"
    for rule, lora_r, expected in [("original", 4, 8), ("original", 16, 32), ("original", 24, 32), (12, 4, 12)]:
        moe.growth_rank, moe.lora_r = rule, lora_r
        assert moe.growth_rank_for_next_expert() == expected  # the original: min(2 * lora_r, 32)


def test_skill_library_gets_the_new_expert_id():
    moe = build(num_experts=1)
    input_ids, mask, _ = batch(rows=2, length=5)
    assert moe.add_new_skill({"input_ids": input_ids, "attention_mask": mask})
    assert list(moe.skill_library.skill_embeddings) == [1]  # stored under the new expert's id


def test_state_and_expert_files_round_trip(tmp_path):
    moe = build(num_experts=3)
    randomize_experts(moe.handle.layers.values())
    with torch.no_grad():
        moe.router.gate.weight.normal_()
    moe.skill_library.add_skill(2, torch.randn(32))
    save_dylo_moe_state(moe, tmp_path / "state")
    save_lora_experts(moe, tmp_path / "experts")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["router.safetensors", "skill_library.safetensors"]
    assert sorted(p.name for p in (tmp_path / "experts").iterdir()) == [f"expert_{i}.safetensors" for i in range(3)]

    other = build(num_experts=3)
    load_dylo_moe_state(other, tmp_path / "state")
    load_lora_experts(other, tmp_path / "experts")
    assert torch.equal(other.router.gate.weight, moe.router.gate.weight)
    assert torch.equal(other.skill_library.get_all_skills(), moe.skill_library.get_all_skills())
    for name, layer in moe.handle.layers.items():
        assert torch.equal(other.handle.layers[name].lora_A, layer.lora_A)
        assert torch.equal(other.handle.layers[name].lora_B, layer.lora_B)
    input_ids, mask, _ = batch()
    with torch.no_grad():
        assert torch.equal(other.eval()(input_ids, mask).logits, moe.eval()(input_ids, mask).logits)
