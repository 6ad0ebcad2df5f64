"""Saving and loading DyLoRA_MoE checkpoints: each expert as a stock peft LoRA adapter, plus router and config.

Layout of a checkpoint folder (nothing else is written there)::

    expert_0/adapter_config.json, expert_0/adapter_model.safetensors   # PeftModel.from_pretrained(base, ...) loads it
    ...
    router.safetensors                                                 # DynamicHybridRouter.save
    dylora_moe_config.json                                             # the model's settings + sha256 of every file

Expert i is written with its own rank and alpha (``layer.expert_ranks[i]`` / ``expert_alphas[i]`` where the layers
have them, else the layers' shared ``r`` / ``alpha``).

Saving (:func:`save_checkpoint`) never deletes what it did not write. The destination must be absent, an empty
folder, or an earlier checkpoint of ours (a folder holding the config JSON and only checkpoint files); anything
else (a file, a folder with other content, such as ``.``) is refused before anything is written. The checkpoint
is written to a staging folder beside the destination and published by an atomic rename or swap (see
:mod:`dylora_moe.io.atomic_folder`): a reader sees the old checkpoint or the new one, never half of one, and a killed
save leaves the previous checkpoint as it was. Staging folders of killed saves are removed by the next save to the
same destination.

Loading (:func:`load_checkpoint`) is all-or-nothing: the config, every listed file (size and sha256), each
tensor's key, dtype and shape are read and checked against the model first; only then are the weights copied in.
Any problem raises :class:`CheckpointError` naming the file, and the model is left exactly as it was. Files beside
the checkpoint that are not ours (a Trainer's optimizer state, a tokenizer) are ignored, but an unlisted entry in
the checkpoint's own namespace (an ``expert_7/`` of a 3-expert checkpoint, an extra file inside ``expert_0/``) is
an error: it means two checkpoints were mixed. Only safetensors and JSON are read (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from ..config import RENAMED
from .atomic_folder import fsync_path, new_staging, publish, remove_stale_staging, stale_staging
from .peft_format import expert_name, lora_config, peft_key

logger = logging.getLogger(__name__)

CONFIG_NAME = "dylora_moe_config.json"
ROUTER_NAME = "router.safetensors"
OPTIONAL_ROUTER_TENSORS = ("selection_bias",)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT_VERSION = 2  # 2: sha256 + size of every file under "checkpoint"."files"; 1 (read only): no checksums
# Top-level config keys that are not model settings (load_checkpoint_model passes the rest to the constructor).
RESERVED_KEYS = ("format_version", "base_model_name_or_path", "checkpoint")
_EXPERT_DIR = re.compile(r"expert_\d+")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written to its destination or read into a model; the message names the path."""


class CheckpointFileMissing(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs is missing (or the folder is not a checkpoint at all)."""


# ----- what belongs to a checkpoint ------------------------------------------------------------------------------


def checkpoint_files(num_experts: int) -> list[str]:
    """Relative paths of the files (besides the config) of a checkpoint with ``num_experts`` experts."""
    experts = [f"{expert_name(i)}/{name}" for i in range(num_experts) for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)]
    return experts + [ROUTER_NAME]


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` whose names a checkpoint never writes (relative paths)."""
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            foreign.append(entry.name)
        elif _EXPERT_DIR.fullmatch(entry.name) and entry.is_dir():
            inside = sorted(
                p.name for p in entry.iterdir() if p.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) or not p.is_file()
            )
            foreign += [f"{entry.name}/{name}" for name in inside]
        elif entry.name not in (CONFIG_NAME, ROUTER_NAME) or not entry.is_file():
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def _holds_only_checkpoint_files(folder: Path) -> bool:
    """Whether everything in ``folder`` has a checkpoint file's name (a staging folder, maybe half written)."""
    try:
        return not _foreign_entries(folder)
    except OSError:
        return False


def _is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a complete checkpoint (its config, and only checkpoint files)."""
    return (folder / CONFIG_NAME).is_file() and _holds_only_checkpoint_files(folder)


def _describe(entries: list[str], limit: int = 5) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


# ----- saving ------------------------------------------------------------------------------------------------------


def model_settings(moe) -> dict:
    """The model's settings for the config JSON: its ``moe_config`` (a DyLoRAMoEConfig) as a dict."""
    return dict(moe.moe_config.to_dict())


def _base_model_name(moe) -> str:
    return getattr(moe.foundation_model.config, "_name_or_path", "") or ""


def expert_rank_alpha(layer, i: int) -> tuple[int, float]:
    """Rank and alpha of expert ``i`` in ``layer``: its own where the layer keeps per-expert values, else the
    layer's shared ``r`` / ``alpha``."""
    ranks, alphas = getattr(layer, "expert_ranks", None), getattr(layer, "expert_alphas", None)
    if ranks is not None and alphas is not None:
        return int(ranks[i]), float(alphas[i])
    return int(layer.r), float(layer.alpha)


def _expert_rank_alpha(layers: dict, i: int) -> tuple[int, float]:
    """Expert ``i``'s rank and alpha, which must be the same in every layer (one peft adapter has one r)."""
    found = {name: expert_rank_alpha(layer, i) for name, layer in layers.items()}
    values = set(found.values())
    if len(values) > 1:
        raise CheckpointError(f"expert {i} has different (rank, alpha) across layers {found}; a peft adapter has one")
    return values.pop()


def _seal(path: Path, mode: int) -> dict:
    """Give ``path`` the umask's permissions (safetensors writes 0600), flush it to disk and return its size and
    sha256 as recorded in the config."""
    os.chmod(path, mode)
    data = path.read_bytes()
    fsync_path(path)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write(moe, folder: Path) -> None:
    """Every checkpoint file into the empty ``folder``, the config (with every other file's checksum) last."""
    layers = moe.handle.layers
    base_name = _base_model_name(moe)
    mode = stat.S_IMODE(folder.stat().st_mode) & 0o666  # the folder was made with the umask: files follow it
    files = {}
    for i in range(moe.num_experts):
        expert_dir = folder / expert_name(i)
        r, alpha = _expert_rank_alpha(layers, i)
        config = lora_config(moe, layers, r=r, alpha=alpha)
        config.base_model_name_or_path = base_name or None
        config.save_pretrained(str(expert_dir))
        tensors = {}
        for name, layer in layers.items():
            tensors[peft_key(name, "lora_A")] = layer.lora_A[i, :r].detach().contiguous().cpu()
            tensors[peft_key(name, "lora_B")] = layer.lora_B[i, :, :r].detach().contiguous().cpu()
        save_file(tensors, str(expert_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for file_name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            files[f"{expert_name(i)}/{file_name}"] = _seal(expert_dir / file_name, mode)
        fsync_path(expert_dir)
    moe.router.save(folder / ROUTER_NAME)
    files[ROUTER_NAME] = _seal(folder / ROUTER_NAME, mode)
    config = {
        "format_version": FORMAT_VERSION,
        "base_model_name_or_path": base_name,
        **model_settings(moe),
        "checkpoint": {"layers": list(layers), "num_experts": moe.num_experts, "files": files},
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    fsync_path(folder / CONFIG_NAME)


def _check_destination(target: Path) -> bool:
    """Whether ``target`` is an earlier checkpoint to replace (True) or absent/empty (False); refuse anything else."""
    if not target.exists():
        return False
    if not target.is_dir():
        raise CheckpointError(
            f"cannot save a checkpoint to {target}: it is a file, not a folder (nothing was written; choose a folder "
            "path)"
        )
    if not any(target.iterdir()):
        return False
    foreign = _foreign_entries(target)
    if not foreign and (target / CONFIG_NAME).is_file():
        return True
    if not foreign:
        foreign = [f"no {CONFIG_NAME}"]
    raise CheckpointError(
        f"cannot save a checkpoint to {target}: the folder holds content that is not a DyLoRA_MoE checkpoint "
        f"({_describe(foreign)}). A save replaces its folder whole, so it only writes to a new or empty folder or "
        "over an earlier checkpoint; nothing was written. Choose another folder, e.g. a new subfolder."
    )


def save_checkpoint(moe, save_directory) -> Path:
    """Write ``moe``'s experts, router and config to ``save_directory`` atomically; returns the folder written.

    Refuses a destination that is a file or holds anything but an earlier checkpoint (see the module docstring)."""
    target = Path(save_directory).resolve()
    replace = _check_destination(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_staging(target, _holds_only_checkpoint_files, _is_checkpoint):
        logger.info("removed %s, left by a save that did not finish", stale)
    staging = new_staging(target)
    try:
        _write(moe, staging)
        replace = _check_destination(target)  # again: the folder may have changed while we wrote
        publish(staging, target, replace=replace, last=CONFIG_NAME)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# ----- reading and validating ------------------------------------------------------------------------------------


def read_config(save_directory) -> dict:
    """The checkpoint's config JSON, checked for structure (errors name the file)."""
    directory = Path(save_directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        hint = ""
        if not directory.exists() and directory.parent.is_dir():
            aside = [p for p in stale_staging(directory.absolute()) if _is_checkpoint(p)]
            if aside:  # see atomic_folder.remove_stale_staging
                hint = f"; a save to it was interrupted and left a complete checkpoint in {aside[0]}"
        raise CheckpointFileMissing(f"{directory} is not a folder: not a DyLoRA_MoE checkpoint{hint}")
    if not path.is_file():
        raise CheckpointFileMissing(f"{path} not found: {directory} is not a DyLoRA_MoE checkpoint")
    try:
        config = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}")
    version = config.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{path}: format_version {version!r}, expected 1 or {FORMAT_VERSION}")
    if version == 1:  # the first format: settings at the top level, target_modules = the layers, no checksums
        config["checkpoint"] = {"layers": config.get("target_modules"), "num_experts": config.get("num_experts")}
    section = config.get("checkpoint")
    if not isinstance(section, dict):
        raise CheckpointError(f"{path}: no 'checkpoint' section (layers, num_experts, files)")
    num_experts, layers = section.get("num_experts"), section.get("layers")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise CheckpointError(f"{path}: num_experts is {num_experts!r}, expected an int >= 1")
    if not isinstance(layers, list) or not layers or not all(isinstance(n, str) for n in layers):
        raise CheckpointError(f"{path}: layers is {layers!r}, expected a non-empty list of module names")
    if version == FORMAT_VERSION:
        files = section.get("files")
        expected = checkpoint_files(num_experts)
        if not isinstance(files, dict):
            raise CheckpointError(f"{path}: 'files' is {files!r}, expected a mapping of file name to size and sha256")
        missing, unexpected = sorted(set(expected) - set(files)), sorted(set(files) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: the files listed do not match a {num_experts}-expert checkpoint: missing "
                f"{_describe(missing) or 'none'}; unexpected {_describe(unexpected) or 'none'}"
            )
        for name, entry in files.items():
            ok = isinstance(entry, dict) and isinstance(entry.get("size"), int)
            if not ok or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256"))):
                raise CheckpointError(f"{path}: files[{name!r}] is {entry!r}, expected {{size, sha256}}")
    return config


def checkpoint_settings(config: dict) -> dict:
    """The model settings of a config read by :func:`read_config` (the constructor keywords)."""
    return {k: v for k, v in config.items() if k not in RESERVED_KEYS}


def _read_file(directory: Path, name: str, record: dict | None) -> bytes:
    """A checkpoint file's bytes, checked against the size and sha256 the config recorded."""
    path = directory / name
    if not path.is_file():
        raise CheckpointFileMissing(f"{path} is missing from checkpoint {directory}")
    data = path.read_bytes()
    if record is None:
        return data
    if len(data) != record["size"]:
        raise CheckpointError(
            f"{path} is {len(data)} bytes, the checkpoint recorded {record['size']}: the file was truncated or "
            "changed after saving"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != record["sha256"]:
        raise CheckpointError(
            f"{path}: content does not match its checksum (sha256 {digest[:16]}..., the checkpoint recorded "
            f"{record['sha256'][:16]}...): the file is corrupted or was changed after saving"
        )
    return data


def _parse_safetensors(path: Path, data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a safetensors file read into memory (errors name the file)."""
    try:
        tensors = load_safetensors_bytes(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    return tensors, header.get("__metadata__") or {}


def _parse_json(path: Path, data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _check_tensor(path: Path, key: str, tensors: dict, shape: tuple) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{path}: tensor {key} is missing")
    tensor = tensors[key]
    if not tensor.is_floating_point():
        raise CheckpointError(f"{path}: {key} has dtype {tensor.dtype}, expected a floating-point tensor")
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor


@dataclass
class _StagedExpert:
    rank: int
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (A [r, d_in], B [d_out, r])


def _read_expert(directory: Path, i: int, layers: dict, records: dict | None) -> _StagedExpert:
    name = expert_name(i)
    config_path, weights_path = directory / name / ADAPTER_CONFIG, directory / name / ADAPTER_WEIGHTS
    record = (lambda n: records[f"{name}/{n}"]) if records is not None else (lambda n: None)
    adapter = _parse_json(config_path, _read_file(directory, f"{name}/{ADAPTER_CONFIG}", record(ADAPTER_CONFIG)))
    data = _read_file(directory, f"{name}/{ADAPTER_WEIGHTS}", record(ADAPTER_WEIGHTS))
    tensors, _ = _parse_safetensors(weights_path, data)
    rank, alpha = _expert_rank_alpha(layers, i)
    saved_r, saved_alpha = adapter.get("r"), adapter.get("lora_alpha")
    if saved_r != rank or not isinstance(saved_alpha, (int, float)) or not math.isclose(saved_alpha, alpha):
        raise CheckpointError(
            f"{config_path}: r={saved_r!r}, lora_alpha={saved_alpha!r}, but the model's expert {i} has r={rank}, "
            f"lora_alpha={alpha!r}"
        )
    expected = {peft_key(n, ab) for n in layers for ab in ("lora_A", "lora_B")}
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CheckpointError(f"{weights_path}: unexpected tensors {_describe(unexpected)}")
    staged = {}
    for layer_name, layer in layers.items():
        a = _check_tensor(weights_path, peft_key(layer_name, "lora_A"), tensors, (rank, layer.lora_A.shape[2]))
        b = _check_tensor(weights_path, peft_key(layer_name, "lora_B"), tensors, (layer.lora_B.shape[1], rank))
        staged[layer_name] = (a, b)
    return _StagedExpert(rank, staged)


def _read_router(directory: Path, router, records: dict | None) -> dict[str, torch.Tensor]:
    path = directory / ROUTER_NAME
    tensors, metadata = _parse_safetensors(path, _read_file(directory, ROUTER_NAME, records and records[ROUTER_NAME]))
    try:
        saved = json.loads(metadata["config"])
        shape = (saved["num_experts"], saved["input_size"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a DynamicHybridRouter file (no valid 'config' in its metadata)") from None
    if shape != (router.num_experts, router.input_size):
        raise CheckpointError(
            f"{path}: a router for {shape[0]} experts of input size {shape[1]}, the model's has {router.num_experts} "
            f"and {router.input_size}"
        )
    expected = router.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {_describe(unexpected)}")
    # Routers saved before loss-free balancing have no selection_bias: the router loads them with a zero bias.
    present = {key: value for key, value in expected.items() if key in tensors or key not in OPTIONAL_ROUTER_TENSORS}
    return {key: _check_tensor(path, key, tensors, value.shape) for key, value in present.items()}


def _check_namespace(directory: Path, num_experts: int) -> None:
    """Refuse checkpoint-named entries the config does not list (a sign of two checkpoints mixed in one folder)."""
    ours = {expert_name(i) for i in range(num_experts)}
    extra = []
    for entry in sorted(directory.iterdir()):
        if _EXPERT_DIR.fullmatch(entry.name) and entry.name not in ours:
            extra.append(entry.name)
        elif entry.name in ours:
            if not entry.is_dir():
                extra.append(entry.name)
                continue
            extra += [
                f"{entry.name}/{p.name}" for p in entry.iterdir() if p.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
            ]
    if extra:
        raise CheckpointError(
            f"checkpoint {directory} ({num_experts} experts) also holds {_describe(extra)}, which it does not list: "
            "files of another checkpoint mixed in? Remove them or load from a clean copy"
        )


@dataclass
class _StagedCheckpoint:
    experts: list[_StagedExpert]
    router: dict[str, torch.Tensor]


def read_checkpoint(moe, save_directory) -> _StagedCheckpoint:
    """Read and check everything ``load_checkpoint`` would apply to ``moe``, without touching it."""
    directory = Path(save_directory)
    config = read_config(directory)
    section = config["checkpoint"]
    num_experts, records = section["num_experts"], section.get("files")
    if records is None:
        logger.warning("%s: a format 1 checkpoint records no checksums; its files are not verified", directory)
    if num_experts != moe.num_experts:
        raise CheckpointError(
            f"checkpoint {directory} has {num_experts} experts but the model has {moe.num_experts}; "
            "build the model from the checkpoint with DyLoRA_MoE.from_pretrained, or grow it first"
        )
    layers = moe.handle.layers
    if sorted(section["layers"]) != sorted(layers):
        only_saved, only_model = (
            sorted(set(section["layers"]) - set(layers)),
            sorted(set(layers) - set(section["layers"])),
        )
        raise CheckpointError(
            f"checkpoint {directory} has experts on other layers than the model: only in the checkpoint "
            f"{_describe(only_saved) or 'none'}; only in the model {_describe(only_model) or 'none'} (build the model "
            "with the checkpoint's target_modules)"
        )
    _check_namespace(directory, num_experts)
    experts = [_read_expert(directory, i, layers, records) for i in range(num_experts)]
    return _StagedCheckpoint(experts, _read_router(directory, moe.router, records))


@torch.no_grad()
def _apply(moe, staged: _StagedCheckpoint) -> None:
    for i, expert in enumerate(staged.experts):
        r = expert.rank
        for name, layer in moe.handle.layers.items():
            a, b = expert.tensors[name]
            layer.lora_A[i, :r].copy_(a)
            layer.lora_A[i, r:].zero_()  # rows above a smaller expert's rank stay zero (padding)
            layer.lora_B[i, :, :r].copy_(b)
            layer.lora_B[i, :, r:].zero_()
    moe.router.load_state_dict(staged.router)


def load_checkpoint(moe, save_directory) -> None:
    """Load experts and router from ``save_directory`` into ``moe``, which must have the same experts and layers.

    All or nothing: everything is read and checked first; on any error ``moe`` is unchanged."""
    _apply(moe, read_checkpoint(moe, save_directory))


def checked_settings(save_directory) -> dict:
    """The saved settings, validated as a :class:`DyLoRAMoEConfig` (an unknown key or a bad value is a
    CheckpointError naming the file, not a TypeError from the constructor)."""
    from ..config import DyLoRAMoEConfig

    settings = checkpoint_settings(read_config(save_directory))
    for former, name in RENAMED.items():  # a checkpoint written before a setting was renamed
        if former in settings:
            settings.setdefault(name, settings.pop(former))
    try:
        DyLoRAMoEConfig.from_dict(settings)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{Path(save_directory) / CONFIG_NAME}: {err}") from None
    return settings


def load_checkpoint_model(cls, save_directory, base_model, **overrides):
    """Build a ``cls`` (DyLoRA_MoE) from the saved config on ``base_model`` and load its weights."""
    settings = checked_settings(save_directory)
    moe = cls(base_model, **{**settings, "mature_experts": False, **overrides})
    load_checkpoint(moe, save_directory)
    return moe
