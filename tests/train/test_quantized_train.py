"""train.py on a quantized base (QLoRA, issue 23 item 1): --load_in_4bit / --load_in_8bit / --bnb_4bit_quant_type /
--use_bnb_nested_quant (TRL's flag names), recorded in run.json and summary.md; bad combinations and a missing
bitsandbytes refused in one line."""

import json
import math
import sys

import pytest
import torch
from train_support import TINY

from dylora_moe.train import cli as train
from dylora_moe.train.args import model_fingerprint

# Hidden 64 (bitsandbytes quantizes in blocks of 64); the MLP is 170 wide, which its CPU inference layout cannot hold.
QUANT_TINY = [*TINY[TINY.index("--tiny_num_layers") :], "--tiny_hidden_size", "64"]


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip()


def test_bad_quantization_flags_are_refused_in_one_line(capsys):
    for argv, message in (
        (["--load_in_4bit", "--load_in_8bit"], "--load_in_4bit and --load_in_8bit exclude each other"),
        (["--bnb_4bit_quant_type", "nf4"], "argument --bnb_4bit_quant_type: applies to --load_in_4bit only"),
        (["--load_in_8bit", "--use_bnb_nested_quant"], "argument --use_bnb_nested_quant: applies to --load_in_4bit"),
        (["--load_in_4bit", "--bnb_4bit_quant_type", "int4"], "argument --bnb_4bit_quant_type: expected nf4 or fp4"),
    ):
        err = _error(capsys, argv)
        assert message in err and len(err.splitlines()) == 1, err


def test_missing_bitsandbytes_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    for flag in ("--load_in_4bit", "--load_in_8bit"):
        err = _error(capsys, [flag])
        assert err.startswith(f"train.py: error: argument {flag}: needs bitsandbytes"), err
        assert err.endswith("pip install 'dylora-moe[quant]'") and len(err.splitlines()) == 1, err
    train.parse_args([])  # a float base does not need it


def test_fingerprint_records_the_quantization_only_when_there_is_one():
    assert "load_in_4bit" not in model_fingerprint(train.parse_args([]))  # float runs: run.json as before
    four = model_fingerprint(train.parse_args(["--load_in_4bit", "--use_bnb_nested_quant"]))
    assert four | {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True} == four
    assert model_fingerprint(train.parse_args(["--load_in_8bit"]))["load_in_8bit"] is True


def test_load_in_4bit_trains_the_tiny_model(tmp_path):
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'dylora-moe[quant]')")
    out = tmp_path / "qlora"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = [*QUANT_TINY, "--load_in_4bit", "--bnb_4bit_quant_type", "fp4", "--use_bnb_nested_quant"]
        result = train.main([*argv, "--kernel", "eager", "--max_steps", "2", "--output_dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    base = result["trainer"].model.foundation_model
    import bitsandbytes as bnb

    assert isinstance(base.model.layers[0].mlp.gate_proj, bnb.nn.Linear4bit)
    gate = base.model.layers[0].mlp.gate_proj.weight
    assert gate.quant_state.quant_type == "fp4"
    assert train.weights_in(gate) == 170 * 64 == 2 * gate.numel()  # the frozen count: weights, not packed bytes
    run = json.loads((out / "run.json").read_text())["fingerprint"]
    assert (run["load_in_4bit"], run["bnb_4bit_quant_type"], run["use_bnb_nested_quant"]) == (True, "fp4", True)
    summary = (out / "summary.md").read_text()
    assert "- base weights: 4-bit fp4, nested quantization (bitsandbytes), compute float32" in summary
    initial, final = result["initial"]["eval_code_alpaca_loss"], result["final"]["eval_code_alpaca_loss"]
    assert math.isfinite(final) and final < initial  # the experts learned over the 4-bit base
    assert (out / "final" / "expert_0" / "adapter_model.safetensors").is_file()  # a plain peft adapter
