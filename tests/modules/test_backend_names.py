"""``backend`` is the word on every public entry (layers, injection, ExpertManager, the model, evaluate's CLI, sweep
files); ``kernel`` stays a quiet alias; one list of backends (dylora_moe.config.BACKENDS)."""

import inspect

import pytest
import torch
from moe_models import tiny_llama

from dylora_moe import DyLoRA_MoE, ExpertManager, MoELoRALinear, MoELoRAMLP, inject_moe_lora
from dylora_moe.config import BACKENDS, LAYER_BACKENDS
from dylora_moe.evaluate import cli as evaluate_cli
from dylora_moe.train import sweep


@pytest.mark.parametrize("entry", [MoELoRALinear, MoELoRAMLP, inject_moe_lora, ExpertManager, DyLoRA_MoE])
def test_every_public_entry_takes_backend(entry):
    assert "backend" in inspect.signature(entry).parameters


def test_backend_and_its_former_name_kernel_do_the_same():
    layer = MoELoRALinear(torch.nn.Linear(8, 8), 2, 4, 8.0, backend="eager")
    assert layer.backend == "eager" == MoELoRALinear(torch.nn.Linear(8, 8), 2, 4, 8.0, kernel="eager").backend
    layer.set_backend("reference")
    assert layer.backend == "loop"
    handle = inject_moe_lora(tiny_llama(layers=1), num_experts=1, r=2, alpha=2, backend="eager")
    assert handle.backend == "eager"
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        inject_moe_lora(tiny_llama(layers=1), num_experts=1, r=2, alpha=2, backend="fast")
    mlp = tiny_llama(layers=1).model.layers[0].mlp
    assert MoELoRAMLP(mlp, 2, 4, 8.0, backend="eager").gate_proj.backend == "eager"
    assert ExpertManager(tiny_llama(layers=1), 4, 8, 0.0, backend="eager").handle.backend == "eager"


def test_one_list_of_backends():
    assert BACKENDS == ("auto", "triton", "eager", "reference")
    assert set(BACKENDS) <= set(LAYER_BACKENDS) and LAYER_BACKENDS["reference"] == "loop"
    import dylora_moe.modules.layer as layer_module

    assert not hasattr(layer_module, "KERNELS") and not hasattr(layer_module, "FORMER_NAMES")


def test_evaluate_cli_takes_backend_and_kernel():
    p = evaluate_cli.parser()
    assert p.parse_args(["--benchmark", "mbpp", "--model_name", "tiny", "--backend", "eager"]).backend == "eager"
    assert p.parse_args(["--benchmark", "mbpp", "--model_name", "tiny", "--kernel", "eager"]).backend == "eager"


def test_the_sweep_file_says_backend():
    assert sweep.REAL_MODEL["backend"] == "triton" and "kernel" not in sweep.REAL_MODEL
