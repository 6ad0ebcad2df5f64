"""The three export formats: ``peft`` (stock adapters), ``vllm`` (adapters checked against what vLLM reads) and
``merged`` (one plain model per expert, and per training domain with ``per_domain``). Each also writes the router
(``router.safetensors``, ``routing.json``) and a README.md of how to route."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from ..io.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ROUTER_NAME
from ..io.peft_format import expert_name
from ..serving import ROUTING_FILE, RoutingSettings
from .folders import prepare, write_marker
from .readme import adapters_readme, merged_readme, target_names, vllm_max_lora_rank
from .source import Checkpoint, ExportError

FORMATS = ("peft", "merged", "vllm")
README = "README.md"
ROUTER_INPUT = "last hidden state of the base model's decoder (adapters off) at each real token of the prompt"


def routing_record(ckpt: Checkpoint, base: str, domains: dict | None = None) -> dict:
    """routing.json: what :class:`dylora_moe.serving.PromptRouter` needs besides the router file."""
    router, config = ckpt.router_config(), ckpt.config
    settings = RoutingSettings(
        top_k=router["top_k"], temperature=router["temperature"], weighting=router.get("weighting", "softmax"),
        renormalize=router.get("renormalize", False), sequence_top_k=config.get("sequence_top_k"),
        use_selection_bias=config.get("balance_loss") == "loss_free",
    )  # fmt: skip
    record = {
        "base_model_name_or_path": base,
        "num_experts": ckpt.num_experts,
        "routing": config.get("routing", "sequence"),
        "router": settings.__dict__,
        "router_input": ROUTER_INPUT,
        "experts": [expert_name(i) for i in range(ckpt.num_experts)],
    }
    if domains:
        record["domains"] = domains
    return record


def vllm_adapter_config(config: dict, where: str) -> dict:
    """The adapter config with the fields vLLM's PEFTHelper reads, checked as its ``validate_legal`` does."""
    problems = []
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        problems.append(f"r is {config.get('r')!r}")
    elif vllm_max_lora_rank(config["r"]) is None:
        problems.append(f"r={config['r']} is above vLLM's largest --max-lora-rank 512")
    if not config.get("target_modules"):
        problems.append("no target_modules")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (vLLM serves bias='none' unless started with bias enabled)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']!r} (vLLM supports none)")
    if config.get("use_dora"):
        problems.append("use_dora (vLLM does not serve DoRA)")
    if problems:
        raise ExportError(f"{where}: not servable by vLLM: {'; '.join(problems)}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, float) and math.isfinite(alpha) and alpha.is_integer():
        config = {**config, "lora_alpha": int(alpha)}  # PEFTHelper declares an int
    return {**config, "bias": "none", "modules_to_save": None, "use_dora": False}


def _write_router(ckpt: Checkpoint, out: Path, record: dict) -> None:
    (out / ROUTER_NAME).write_bytes(ckpt.read(ROUTER_NAME))
    (out / ROUTING_FILE).write_text(json.dumps(record, indent=2) + "\n")


def export_adapters(ckpt: Checkpoint, out: Path, fmt: str, base: str, progress: Callable[[str], None]) -> None:
    """``peft`` / ``vllm``: each expert's adapter (checked, then copied), the router and a README."""
    configs = []
    for i in range(ckpt.num_experts):
        config = {**ckpt.adapter_config(i), "base_model_name_or_path": base or None}
        if fmt == "vllm":
            config = vllm_adapter_config(config, str(ckpt.path / expert_name(i) / ADAPTER_CONFIG))
        configs.append(config)
    entries = [expert_name(i) for i in range(ckpt.num_experts)] + [ROUTER_NAME, ROUTING_FILE, README]
    prepare(out, entries, fmt)
    for i, config in enumerate(configs):
        folder = out / expert_name(i)
        folder.mkdir()
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (folder / ADAPTER_WEIGHTS).write_bytes(ckpt.adapter_weights(i))
        progress(f"wrote {folder}/ ({fmt} adapter of expert {i}: r={config['r']}, lora_alpha={config['lora_alpha']})")
    record = routing_record(ckpt, base)
    _write_router(ckpt, out, record)
    experts = [(expert_name(i), c["r"], float(c["lora_alpha"])) for i, c in enumerate(configs)]
    targets = target_names([t for c in configs for t in target_names(c["target_modules"])])
    (out / README).write_text(adapters_readme(str(out), base, experts, targets, record["routing"], fmt))
    progress(f"wrote {out / ROUTER_NAME}, {out / ROUTING_FILE} and {out / README} (how to route)")
    write_marker(out, entries, fmt, complete=True)


def load_model(ckpt: Checkpoint, base: str, progress: Callable[[str], None]):
    """The DyLoRA_MoE of ``ckpt`` on ``base`` (eager backend, eval mode), and the tokenizer found beside either
    (None if neither has one)."""
    from transformers import AutoTokenizer

    from ..model import DyLoRA_MoE

    progress(f"loading base model {base} with the {ckpt.num_experts} experts of {ckpt.path}")
    try:
        moe = DyLoRA_MoE.from_pretrained(base, ckpt.path, backend="eager").eval()
    except (OSError, ValueError) as err:  # a missing or unreadable base, a CheckpointError
        raise ExportError(f"cannot load {ckpt.path} on base model {base!r}: {str(err).splitlines()[0]}") from None
    tokenizer = None
    for source in (ckpt.path, base):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
            break
        except (OSError, ValueError, TypeError):
            continue
    return moe, tokenizer


def export_merged(
    ckpt: Checkpoint,
    out: Path,
    base: str,
    progress: Callable[[str], None],
    domain_weights: Callable | None = None,
) -> None:
    """``merged``: one plain model per expert (and per domain, from ``domain_weights(moe, tokenizer)`` = (weights
    per domain, source line)), the router and a README."""
    from .merge import MergeError, check_mergeable, routing_weights

    moe, tokenizer = load_model(ckpt, base, progress)
    plan = [(expert_name(i), {"expert": i}, f"expert {i} alone") for i in range(ckpt.num_experts)]
    domains = None
    if domain_weights is not None:
        weights, source = domain_weights(moe, tokenizer)
        progress(f"per-domain routing: {source}")
        domains = {d: {"folder": f"domain_{d}", "weights": w, "source": source} for d, w in weights.items()}
        for d, w in weights.items():
            plan.append((f"domain_{d}", {"weights": w}, f"domain {d}: weights " + ", ".join(f"{x:.3f}" for x in w)))
    try:
        for _, how, _ in plan:
            check_mergeable(moe, routing_weights(moe.num_experts, **how))
    except MergeError as err:
        raise ExportError(str(err)) from None
    entries = [name for name, _, _ in plan] + [ROUTER_NAME, ROUTING_FILE, README]
    prepare(out, entries, "merged")
    for name, how, what in plan:
        model = moe.merged(**how)
        model.save_pretrained(out / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(out / name)
        del model
        progress(f"wrote {out / name}/ (merged model: {what})")
    _write_router(ckpt, out, routing_record(ckpt, base, domains))
    (out / README).write_text(merged_readme(str(out), base, [(n, w) for n, _, w in plan], moe.routing, moe.num_experts))
    progress(f"wrote {out / ROUTER_NAME}, {out / ROUTING_FILE} and {out / README} (how to route)")
    write_marker(out, entries, "merged", complete=True)
