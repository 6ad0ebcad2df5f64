"""The original's ``utils`` functions: parameter summary, router/skill-library state, per-expert weight files.

Files we write are safetensors (``router.safetensors``, ``skill_library.safetensors``, ``expert_<i>.safetensors``);
the loaders also read the original's ``torch.save`` files (``router.pt``, ``skill_library.pt``, ``expert_<i>.pt``)
with ``weights_only=True`` only. The full checkpoint (each expert a stock peft adapter) is
``DyLoRA_MoE.save_pretrained`` / ``from_pretrained``; these functions exist for code ported from the original.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from .original_files import is_safetensors_file, load_torch_file

ROUTER_FILES = ("router.safetensors", "router.pt")
SKILL_LIBRARY_FILES = ("skill_library.safetensors", "skill_library.pt")


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: N || all params: M || trainable%: P`` (the original's line)."""
    all_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    share = 100 * trainable / all_params if all_params else 0.0
    print(f"trainable params: {trainable} || all params: {all_params} || trainable%: {share}")


def save_dylo_moe_state(model, save_directory) -> None:
    """Write the router (``router.safetensors``) and the skill library (``skill_library.safetensors``)."""
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.router.save(directory / ROUTER_FILES[0])
    model.skill_library.save(directory / SKILL_LIBRARY_FILES[0])


def _first_existing(directory: Path, names) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def load_dylo_moe_state(model, load_directory) -> None:
    """Read what :func:`save_dylo_moe_state` (or the original's, ``router.pt`` / ``skill_library.pt``) wrote into
    ``model``: router weights and maturity (the router must have as many experts) and the skill library.
    (Not in the original, which loaded each with ``DynamicHybridRouter.load`` / ``SkillLibrary.load``.)"""
    from ..modules.router import DynamicHybridRouter
    from ..modules.skills import SkillLibrary

    directory = Path(load_directory)
    router_path = _first_existing(directory, ROUTER_FILES)
    if router_path is None:
        raise FileNotFoundError(f"no {' or '.join(ROUTER_FILES)} in {directory}")
    router = DynamicHybridRouter.load(router_path)
    if (router.num_experts, router.input_size) != (model.router.num_experts, model.router.input_size):
        raise ValueError(
            f"{router_path}: a router of {router.num_experts} experts over {router.input_size} inputs, the model's has "
            f"{model.router.num_experts} over {model.router.input_size}"
        )
    library_path = _first_existing(directory, SKILL_LIBRARY_FILES)
    library = None if library_path is None else SkillLibrary.load(library_path, model.skill_library.embedding_size)
    model.router.load_state_dict(router.state_dict())
    if library is not None:
        model.skill_library.skill_embeddings = library.skill_embeddings


def save_lora_experts(model, save_directory) -> None:
    """Write each expert's weights to ``expert_<i>.safetensors``, keyed by the original's peft parameter names
    (:meth:`ExpertManager.get_expert_weights`)."""
    from safetensors.torch import save_file

    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    manager = model.expert_manager
    for expert_id in range(manager.num_experts):
        weights = {k: v.contiguous() for k, v in manager.get_expert_weights(expert_id).items()}
        save_file(weights, str(directory / f"expert_{expert_id}.safetensors"), metadata={"format": "pt"})


def _read_expert_file(path: Path) -> dict:
    if is_safetensors_file(path):
        from safetensors.torch import load_file

        return load_file(str(path))
    data = load_torch_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not an expert weights file: it holds a {type(data).__name__}, expected a dict")
    if not data:
        raise ValueError(
            f"{path} holds no weights (the original's save_lora_experts wrote only weights that required grad, so "
            "experts it never trained were saved empty)"
        )
    return data


def load_lora_experts(model, load_directory, strict: bool = True) -> None:
    """Load ``expert_<i>.safetensors`` or the original's ``expert_<i>.pt`` files into the stacked experts.

    Keys are mapped from the original's peft parameter names
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.expert_0.weight``) onto row i of each layer's stacked
    ``lora_A``/``lora_B``. All files are read and validated before any weight changes. ``strict`` (default): every
    expert of the model needs a file and no file may name an expert the model lacks; ``strict=False`` skips missing
    files with a warning, as the original did.
    """
    directory = Path(load_directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    manager = model.expert_manager
    plans, missing = [], []
    for expert_id in range(manager.num_experts):
        path = _first_existing(directory, (f"expert_{expert_id}.safetensors", f"expert_{expert_id}.pt"))
        if path is None:
            missing.append(expert_id)
            continue
        plans.append(manager.plan_expert_weights(expert_id, _read_expert_file(path), source=str(path)))
    extra = sorted(
        p.name for p in directory.glob("expert_*.*")
        if p.stem[7:].isdigit() and int(p.stem[7:]) >= manager.num_experts and p.suffix in (".pt", ".safetensors")
    )  # fmt: skip
    if strict and (missing or extra):
        problems = [f"no weights file for experts {missing}"] if missing else []
        problems += [f"files for experts the model does not have: {extra} (grow the model first)"] if extra else []
        raise FileNotFoundError(f"{directory}: {'; '.join(problems)} (strict=False loads what is there)")
    if missing:
        warnings.warn(f"{directory}: no weights file for experts {missing}; they keep their weights", stacklevel=2)
    for plan in plans:
        manager.apply_plan(plan)
