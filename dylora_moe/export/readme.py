"""The README.md each export writes beside what it exported: what the folders are and how to route requests."""

from __future__ import annotations

# vLLM's accepted values of --max-lora-rank (vllm/config/lora.py, MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank`` (None: above vLLM's largest)."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def _routing_section(out: str, routing: str, serve_line: str) -> str:
    token_note = (
        "\nThis model was trained with **token routing** (each token's top-k experts mixed inside every LoRA layer). "
        "Today's multi-LoRA engines (vLLM, TGI, LoRAX) apply one adapter per request, so per-token switching and "
        "in-layer mixing of several adapters cannot be served there; routing once per request serves the prompt's "
        "average routing, which is what `DyLoRA_MoE.generate` decodes with too (the prompt's token weights "
        "averaged). A mix of experts is served exactly by a merged model (`--format merged --per_domain`, or "
        "`moe.merged(weights=...)`).\n"
        if routing == "token"
        else ""
    )
    return f"""## How to route

The router reads the base model's last hidden states over the prompt (adapters off). Route each request once,
then serve it with the chosen expert:

```python
from dylora_moe.serving import PromptRouter

router = PromptRouter.load("{out}")
weights = router.route(base_model, input_ids, attention_mask)  # [batch, experts]; base_model: the plain base
expert = weights.argmax(-1)                                     # serve row b with expert_<expert[b]>
```

Cost: one forward of the base decoder over the prompt (a prefill without the LM head or any decoding), plus a
[tokens, hidden] x [hidden, {{experts}}] product. `dylora_moe.serving` needs torch and safetensors only.
{serve_line}{token_note}"""


def target_names(target_modules) -> list[str]:
    """The module names (last name components) an adapter's ``target_modules`` lists, as vLLM checks them."""
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def adapters_readme(
    out: str, base: str, experts: list[tuple[str, int, float]], targets: list[str], routing: str, fmt: str
) -> str:
    """README of a ``peft`` or ``vllm`` export: ``experts`` = (folder, rank, alpha) each; ``targets`` the target
    module names."""
    rows = "\n".join(f"| `{name}/` | {r} | {alpha:g} |" for name, r, alpha in experts)
    max_rank = max(r for _, r, _ in experts)
    if fmt == "vllm":
        modules = " ".join(f"{name}={out}/{name}" for name, _, _ in experts)
        serve = f"""
## Serving with vLLM

```bash
vllm serve {base} --enable-lora --max-lora-rank {vllm_max_lora_rank(max_rank)} --max-loras {len(experts)} \\
    --lora-modules {modules}
```

Largest expert rank: {max_rank} (`--max-lora-rank` must be at least that, and one of vLLM's values
{", ".join(map(str, VLLM_MAX_LORA_RANKS))}). Target modules: {", ".join(targets)} (full module names in each
`adapter_config.json`); vLLM's class for the base architecture must support LoRA on them. A request names its
expert as the model: `"model": "expert_0"`.
"""
        serve_line = 'With vLLM: send the request with `"model": "expert_<e>"`.\n'
    else:
        serve = """
## Loading with peft

```python
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "OUT/expert_0", adapter_name="expert_0")
model.load_adapter("OUT/expert_1", adapter_name="expert_1")
model.set_adapter("expert_1")
```
""".replace("OUT", out)
        serve_line = 'With peft: `model.set_adapter(f"expert_{e}")` before `generate`.\n'
    return f"""# DyLoRA-MoE experts, one LoRA adapter each ({fmt})

Base model: `{base}`. Each folder is a stock peft LoRA adapter (`adapter_config.json`,
`adapter_model.safetensors`); `router.safetensors` and `routing.json` are the trained router and its settings.

| adapter | rank | alpha |
| --- | --- | --- |
{rows}
{serve}
{_routing_section(out, routing, serve_line).replace("{experts}", str(len(experts)))}"""


def merged_readme(out: str, base: str, folders: list[tuple[str, str]], routing: str, num_experts: int) -> str:
    """README of a ``merged`` export: ``folders`` = (folder, what was merged) each."""
    rows = "\n".join(f"| `{name}/` | {what} |" for name, what in folders)
    serve_line = "Serve each folder as its own model; send a request to the folder of its expert.\n"
    return f"""# DyLoRA-MoE experts merged into the base weights

Base model: `{base}`. Each folder is a plain transformers model (`AutoModelForCausalLM.from_pretrained` loads it,
without dylora_moe): the base with the routing fixed as below and merged into its weights.

| model | routing merged in |
| --- | --- |
{rows}

{_routing_section(out, routing, serve_line).replace("{experts}", str(num_experts))}"""
