"""Saving and loading DyLoRA_MoE checkpoints: each expert as a stock peft LoRA adapter, plus router and config.

Layout of ``save_directory``::

    expert_0/adapter_config.json, expert_0/adapter_model.safetensors   # PeftModel.from_pretrained(base, ...) loads it
    ...
    router.safetensors                                                 # DynamicHybridRouter.save
    dylora_moe_config.json                                             # the constructor arguments

Writes are atomic: everything goes to a temporary sibling directory, which replaces ``save_directory`` by rename
only once complete, so an interrupted save leaves the previous checkpoint (or none), never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .peft_format import expert_name, lora_config
from .router import DynamicHybridRouter

CONFIG_NAME = "dylora_moe_config.json"
ROUTER_NAME = "router.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT_VERSION = 1


def _peft_key(layer_name: str, which: str) -> str:
    # peft stores adapter weights relative to the PeftModel, without the adapter name.
    return f"base_model.model.{layer_name}.{which}.weight"


def model_config(moe) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "base_model_name_or_path": getattr(moe.foundation_model.config, "_name_or_path", "") or "",
        "num_experts": moe.num_experts,
        "lora_r": moe.lora_r,
        "lora_alpha": moe.lora_alpha,
        "lora_dropout": moe.lora_dropout,
        "allow_expert_growth": moe.allow_expert_growth,
        "routing": moe.routing,
        "top_k": moe.router.top_k,
        "temperature": moe.router.temperature,
        "router_weighting": moe.router.weighting,
        "renormalize": moe.router.renormalize,
        "sequence_top_k": moe.sequence_top_k,
        "balance_loss": moe.balance_loss_form,
        "balance_coefficient": moe.balance_coefficient,
        "z_loss_coefficient": moe.z_loss_coefficient,
        "target_modules": list(moe.handle.layers),
    }


def _write(moe, directory: Path) -> None:
    layers = moe.handle.layers
    config = lora_config(moe, layers)
    config.base_model_name_or_path = model_config(moe)["base_model_name_or_path"] or None
    for i in range(moe.num_experts):
        expert_dir = directory / expert_name(i)
        config.save_pretrained(str(expert_dir))
        tensors = {}
        for name, layer in layers.items():
            tensors[_peft_key(name, "lora_A")] = layer.lora_A[i].detach().contiguous().cpu()
            tensors[_peft_key(name, "lora_B")] = layer.lora_B[i].detach().contiguous().cpu()
        save_file(tensors, str(expert_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    moe.router.save(directory / ROUTER_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps(model_config(moe), indent=2))


def save_checkpoint(moe, save_directory) -> None:
    """Write ``moe``'s experts, router and config to ``save_directory`` atomically (see the module docstring)."""
    target = Path(save_directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write(moe, tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_config(save_directory) -> dict:
    path = Path(save_directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {save_directory} is not a DyLoRA_MoE checkpoint")
    config = json.loads(path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}")
    return config


@torch.no_grad()
def load_checkpoint(moe, save_directory) -> None:
    """Load experts and router from ``save_directory`` into ``moe``, which must have the same experts and layers."""
    directory = Path(save_directory)
    config = read_config(directory)
    if config["num_experts"] != moe.num_experts:
        raise ValueError(
            f"checkpoint {directory} has {config['num_experts']} experts but the model has {moe.num_experts}; "
            "build the model with DyLoRA_MoE.from_pretrained(directory, base_model) or grow it first"
        )
    layers = moe.handle.layers
    if sorted(config["target_modules"]) != sorted(layers):
        raise ValueError(
            f"checkpoint {directory} targets {sorted(config['target_modules'])}, the model {sorted(layers)}"
        )
    for i in range(moe.num_experts):
        path = directory / expert_name(i) / ADAPTER_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from checkpoint {directory}")
        tensors = load_file(str(path))
        for name, layer in layers.items():
            for which, param in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
                key = _peft_key(name, which)
                if key not in tensors or tensors[key].shape != param.shape[1:]:
                    got = tuple(tensors[key].shape) if key in tensors else "missing"
                    raise ValueError(f"{path}: {key} is {got}, expected {tuple(param.shape[1:])}")
                param[i].copy_(tensors[key])
    router = DynamicHybridRouter.load(directory / ROUTER_NAME)
    if router.num_experts != moe.num_experts or router.input_size != moe.router.input_size:
        raise ValueError(f"{directory / ROUTER_NAME} does not match the model's router")
    moe.router.load_state_dict(router.state_dict())


def load_checkpoint_model(cls, save_directory, base_model, **overrides):
    """Build a ``cls`` (DyLoRA_MoE) from the saved config on ``base_model`` and load its weights."""
    config = read_config(save_directory)
    kwargs = {k: v for k, v in config.items() if k not in ("format_version", "base_model_name_or_path")}
    kwargs.update(overrides)
    moe = cls(base_model, mature_experts=False, **kwargs)
    load_checkpoint(moe, save_directory)
    return moe
