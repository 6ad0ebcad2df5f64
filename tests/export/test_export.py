"""python -m dylora_moe.export: peft / merged / vllm folders that reproduce the MoE, and a safe output folder."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moe_models import VOCAB, batch, randomize_experts, tiny_llama
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from dylora_moe import DyLoRA_MoE
from dylora_moe.export import ExportError, export_checkpoint
from dylora_moe.export.__main__ import main
from dylora_moe.export.folders import MARKER
from dylora_moe.serving import PromptRouter

GENERATE = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A base model folder, and a 3-expert checkpoint on it at run/final (heterogeneous ranks and alphas)."""
    root = tmp_path_factory.mktemp("export")
    tiny_llama().save_pretrained(root / "base")
    moe = DyLoRA_MoE(
        str(root / "base"), num_experts=3, lora_r=4, lora_alpha=8, backend="eager", top_k=2,
        expert_ranks=[4, 8, 4], expert_alphas=[8, 8, 16],
    ).eval()  # fmt: skip
    randomize_experts(moe.handle.layers.values())
    with torch.no_grad():
        moe.router.gate.weight.normal_()
    moe.save_pretrained(root / "run" / "final")
    return root, moe


def quiet(_line):
    pass


def forced(moe, prompt, expert):
    return moe.generate(prompt, expert_weights=torch.eye(moe.num_experts)[expert][None], **GENERATE)


def test_peft_export_round_trip_token_for_token(run, tmp_path):
    root, moe = run
    lines = []
    export_checkpoint(root / "run" / "final", tmp_path / "out", "peft", progress=lines.append)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER, "README.md", "router.safetensors", "routing.json", "expert_0", "expert_1", "expert_2"]
    )
    assert sum(line.startswith("wrote ") for line in lines) == 4  # one line per folder, one for the router files
    prompt = batch()[0][:1, :5]
    for expert in range(3):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), out / f"expert_{expert}")
        assert torch.equal(model.eval().generate(input_ids=prompt, **GENERATE), forced(moe, prompt, expert))
    routing = json.loads((out / "routing.json").read_text())
    assert routing["experts"] == ["expert_0", "expert_1", "expert_2"] and routing["routing"] == "sequence"
    assert "PromptRouter.load" in (out / "README.md").read_text()


def test_merged_export_round_trip_token_for_token(run, tmp_path):
    root, moe = run
    assert main([str(root / "run" / "final"), str(tmp_path / "out"), "--format", "merged"]) == 0
    prompt = batch()[0][:1, :5]
    for expert in range(3):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / f"expert_{expert}").eval()
        assert torch.equal(model.generate(prompt, **GENERATE), forced(moe, prompt, expert))


def test_merged_per_domain_from_the_runs_saved_statistics(run, tmp_path):
    root, moe = run
    util = {"code_alpaca": [0.7, 0.2, 0.1], "mbpp": [0.1, 0.3, 0.6]}
    record = {f"eval_{d}_util_expert_{e}": w for d, ws in util.items() for e, w in enumerate(ws)}
    metrics = [{"step": 10, "eval_code_alpaca_loss": 1.0}, {"step": 20, **record}, {"step": 21, "loss": 0.5}]
    (root / "run" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    try:
        export_checkpoint(root / "run" / "final", tmp_path / "out", "merged", per_domain=True, progress=quiet)
    finally:
        (root / "run" / "metrics.jsonl").unlink()
    out = tmp_path / "out"
    domains = json.loads((out / "routing.json").read_text())["domains"]
    assert set(domains) == set(util)
    for domain, weights in util.items():
        assert domains[domain]["weights"] == pytest.approx(weights) and domains[domain]["folder"] == f"domain_{domain}"
    prompt = batch()[0][:1, :5]
    for domain, weights in util.items():
        model = AutoModelForCausalLM.from_pretrained(out / f"domain_{domain}").eval()
        expected = moe.generate(prompt, expert_weights=torch.tensor([weights]), **GENERATE)
        assert torch.equal(model.generate(prompt, **GENERATE), expected)
    assert (out / "expert_0" / "config.json").is_file()  # the per-expert models too


class CharTokenizer:
    """Characters to ids below the tiny model's vocabulary."""

    def __call__(self, text, truncation=True, max_length=512, return_tensors="pt"):
        ids = [3 + ord(c) % (VOCAB - 3) for c in text][:max_length]
        return {"input_ids": torch.tensor([ids])}


def test_per_domain_measured_on_the_validation_splits(run, tmp_path):
    from dylora_moe.export import domains

    root, moe = run
    rows = [{"instruction": f"write function {i}", "output": "def f():\n    return " + "x" * i} for i in range(20)]
    (tmp_path / "code_alpaca_2k.json").write_text(json.dumps(rows))
    (tmp_path / "mbpp.jsonl").write_text(
        "".join(json.dumps({"text": f"task {i} " * (i % 5 + 1)}) + "\n" for i in range(30))
    )
    weights, source = domains.measured(moe, CharTokenizer(), tmp_path, max_length=24)
    assert set(weights) == {"code_alpaca", "mbpp"} and str(tmp_path) in source
    # Independently: the forward's mean routing weight per row (expert_utilization), counted by its tokens.
    from dylora_moe.corpora import load_domain

    texts = load_domain(tmp_path, "mbpp").texts["validation"]
    total = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for text in texts:
            ids = CharTokenizer()(text, max_length=24)["input_ids"]
            total += moe(ids).expert_utilization.double() * ids.shape[1]
    assert weights["mbpp"] == pytest.approx((total / total.sum()).tolist(), abs=1e-6)


VLLM_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")  # parse_fine_tuned_lora_name


def test_vllm_export_holds_the_fields_vllm_reads(run, tmp_path):
    """Checked against vLLM's PEFTHelper (required r, lora_alpha, target_modules; validate_legal: bias 'none',
    no modules_to_save, no DoRA, r <= --max-lora-rank) and LoRAModel.from_local_checkpoint (adapter_model.safetensors
    keys base_model.model.<module>.lora_A/B.weight, each module's last name a target module)."""
    root, moe = run
    export_checkpoint(root / "run" / "final", tmp_path / "out", "vllm", progress=quiet)
    out = tmp_path / "out"
    readme = (out / "README.md").read_text()
    assert "--max-lora-rank 8" in readme  # the largest expert rank is 8, one of vLLM's accepted values
    assert "Target modules: k_proj, o_proj, q_proj, v_proj" in readme
    assert "--lora-modules " + " ".join(f"expert_{i}={out}/expert_{i}" for i in range(3)) in readme
    for i, rank in enumerate([4, 8, 4]):
        config = json.loads((out / f"expert_{i}" / "adapter_config.json").read_text())
        assert {"r", "lora_alpha", "target_modules"} <= set(config)
        assert config["r"] == rank and isinstance(config["lora_alpha"], int)
        assert (config["bias"], config["modules_to_save"], config["use_dora"]) == ("none", None, False)
        assert config["base_model_name_or_path"] == str(root / "base")
        targets = {t.rsplit(".", 1)[-1] for t in config["target_modules"]}
        with safe_open(str(out / f"expert_{i}" / "adapter_model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                match = VLLM_KEY.fullmatch(key)
                assert match and match["module"].rsplit(".", 1)[-1] in targets, key
                layer = moe.handle.layers[match["module"]]
                shape = (rank, layer.d_in) if match["ab"] == "A" else (layer.d_out, rank)
                assert tuple(f.get_tensor(key).shape) == shape
        assert len(keys) == 2 * len(moe.handle.layers)


def test_exported_router_routes_like_the_model(run, tmp_path):
    root, moe = run
    export_checkpoint(root / "run" / "final", tmp_path / "out", "peft", progress=quiet)
    router = PromptRouter.load(tmp_path / "out")
    input_ids, mask, _ = batch()
    base = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    torch.testing.assert_close(router.route(base, input_ids, mask), moe.prompt_expert_weights(input_ids, mask))


def test_output_folder_is_never_overwritten_unless_ours(run, tmp_path):
    root, _ = run
    final = root / "run" / "final"
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="holds files this exporter did not write"):
        export_checkpoint(final, user, "peft", progress=quiet)
    with pytest.raises(ExportError, match="holds files this exporter did not write"):  # before loading any model
        export_checkpoint(final, user, "merged", base_model=str(tmp_path / "no_model_here"), progress=quiet)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    with pytest.raises(ExportError, match="is a file, not a folder"):
        export_checkpoint(final, user / "notes.txt", "peft", progress=quiet)
    ours = tmp_path / "ours"
    export_checkpoint(final, ours, "peft", progress=quiet)
    (ours / "extra.txt").write_text("a file added beside the export")
    export_checkpoint(final, ours, "vllm", progress=quiet)  # replaces what it wrote, keeps the rest
    assert (ours / "extra.txt").read_text() == "a file added beside the export"
    assert json.loads((ours / MARKER).read_text())["format"] == "vllm"
    (ours / "expert_0").rename(ours / "moved")
    (ours / "router.safetensors").unlink()
    (ours / "router.safetensors").mkdir()  # now something it did not write sits at one of its names
    marker = json.loads((ours / MARKER).read_text())
    marker["entries"].remove("router.safetensors")
    (ours / MARKER).write_text(json.dumps(marker))
    with pytest.raises(ExportError, match="already holds router.safetensors, which no earlier export wrote"):
        export_checkpoint(final, ours, "peft", progress=quiet)


def test_merged_refusals_come_before_anything_is_written(run, tmp_path):
    root, _ = run
    ffn = DyLoRA_MoE(str(root / "base"), num_experts=2, lora_r=4, lora_alpha=8, backend="eager", mixture="ffn")
    ffn.save_pretrained(tmp_path / "run" / "final")
    record = {f"eval_mbpp_util_expert_{e}": 0.5 for e in range(2)}
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(ExportError, match="mixture='ffn' mixes the experts' whole MLP outputs"):
        export_checkpoint(tmp_path / "run" / "final", tmp_path / "out", "merged", per_domain=True, progress=quiet)
    with pytest.raises(ExportError, match="cannot load .* on base model"):
        export_checkpoint(root / "run" / "final", tmp_path / "out", "merged", base_model=str(tmp_path), progress=quiet)
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line_and_exit_2(run, tmp_path, capsys):
    root, _ = run
    final, out = str(root / "run" / "final"), str(tmp_path / "out")
    shell = subprocess.run(
        [sys.executable, "-m", "dylora_moe.export", str(tmp_path / "nothing"), out, "--format", "peft"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert shell.returncode == 2 and shell.stdout == "", shell.stderr
    assert shell.stderr.count("\n") == 1 and "not a DyLoRA_MoE checkpoint" in shell.stderr, shell.stderr
    cases = [
        ([final, out, "--format", "onnx"], "invalid choice: 'onnx'"),
        ([final, out], "--format"),
        ([final, out, "--format", "peft", "--per_domain"], "--per_domain merges each domain's routing"),
        ([final, out, "--format", "merged", "--per_domain"], "metrics.jsonl"),
    ]
    for args, message in cases:
        try:
            status = main(args)
        except SystemExit as exit_:  # argparse's errors
            status = exit_.code
        err = capsys.readouterr().err
        assert status == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()
