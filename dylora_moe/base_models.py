"""Base models for train.py: a hub id or local path, or ``tiny``, the offline default; either may be loaded quantized.

``tiny`` is a small Llama-architecture causal LM built from a config (random initialisation, seeded) with a
byte-level BPE tokenizer trained by the ``tokenizers`` library on the training text. Both are saved once under
``<cache_dir>/tiny-<hash>/`` (the hash covers the training text and the config) and loaded from there afterwards, so
a resumed run, a second process, or a later evaluation get the very same frozen base; that folder is also a normal
local model path (``AutoModelForCausalLM.from_pretrained`` / ``--model_name`` accept it).

``--load_in_4bit`` / ``--load_in_8bit`` (:class:`Quantization`) load either kind through transformers'
``BitsAndBytesConfig``, as TRL's flags of the same names do: the tiny model is quantized from its saved folder like
any local model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .io.atomic_folder import new_staging, publish

TINY = "tiny"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


class ModelLoadError(OSError):
    """A base model or tokenizer cannot be loaded; the message says where it looked and what to pass instead."""


@dataclass(frozen=True)
class Quantization:
    """How the base model's linear layers are stored (bitsandbytes): ``bits`` 4 (``quant_type`` nf4 | fp4,
    ``nested``: double quantization of the constants) or 8 (LLM.int8, which computes in its input's dtype).
    ``compute_dtype``: what 4-bit layers compute in (the load dtype, else float32)."""

    bits: int
    quant_type: str = "nf4"
    nested: bool = False
    compute_dtype: torch.dtype = torch.float32

    @classmethod
    def from_flags(cls, args, dtype: torch.dtype | None) -> Quantization | None:
        """From train.py's checked flags (``--load_in_4bit`` ...); None for a float base."""
        if args.load_in_4bit:
            return cls(4, args.bnb_4bit_quant_type or "nf4", args.use_bnb_nested_quant, dtype or torch.float32)
        if args.load_in_8bit:
            return cls(8)
        return None

    def config(self):
        """transformers' BitsAndBytesConfig for ``from_pretrained(..., quantization_config=...)``."""
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.nested,
            bnb_4bit_compute_dtype=self.compute_dtype,
        )

    def describe(self) -> str:
        """One line for summary.md, e.g. ``4-bit nf4, nested quantization (bitsandbytes), compute float32``."""
        if self.bits == 8:
            return "8-bit LLM.int8 (bitsandbytes)"
        nested = ", nested quantization" if self.nested else ""
        compute = str(self.compute_dtype).removeprefix("torch.")
        return f"4-bit {self.quant_type}{nested} (bitsandbytes), compute {compute}"


@dataclass(frozen=True)
class TinyConfig:
    """Shape of the offline model. The defaults give ~3M frozen parameters: a CPU training step takes seconds."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    vocab_size: int = 4096
    max_position_embeddings: int = 2048
    seed: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size {self.vocab_size} must be >= 300 (256 bytes + special tokens + merges)")


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE on ``texts`` (every byte is in the alphabet, so any text encodes), as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def build_tiny_model(config: TinyConfig, tokenizer):
    """A randomly initialised LlamaForCausalLM (seeded: the same config gives the same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.hidden_size * 8 // 3,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        return LlamaForCausalLM(llama)


def tiny_dir(cache_dir: str | Path, texts: Sequence[str], config: TinyConfig) -> Path:
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return Path(cache_dir) / f"tiny-{digest.hexdigest()[:12]}"


def load_or_build_tiny(
    cache_dir: str | Path, texts: Sequence[str], config: TinyConfig = TinyConfig(), quantization=None
):
    """(model, tokenizer, folder): loaded from the cache folder (quantized as ``quantization`` says), or built, saved
    atomically, and returned.

    Under torchrun the local main process builds (the tokenizer is trained once) and the others wait for its folder,
    so every process loads the same files; a folder is published by one rename, so it is complete or absent.
    """
    folder = tiny_dir(cache_dir, texts, config)
    if not (folder / "config.json").is_file():
        if os.environ.get("LOCAL_RANK", "0") == "0":
            _build_tiny(folder, texts, config)
        else:
            _wait_for(folder / "config.json")
    model, tokenizer = load_pretrained(str(folder), quantization=quantization)
    return model, tokenizer, folder


def _build_tiny(folder: Path, texts: Sequence[str], config: TinyConfig) -> None:
    tokenizer = train_tokenizer(texts, config.vocab_size)
    model = build_tiny_model(config, tokenizer)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = new_staging(folder)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        publish(staging, folder, replace=False, last="config.json")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise
        # else another run built it first (a second job on the same output folder): keep its copy


def _wait_for(path: Path, timeout_s: float = 1800.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise ModelLoadError(f"waited {timeout_s:.0f} s for the local main process to build {path.parent}")
        time.sleep(0.2)


def load_pretrained(
    name_or_path: str,
    *,
    token: str | None = None,
    dtype: torch.dtype | None = None,
    quantization: Quantization | None = None,
):
    """(model, tokenizer) from a hub id or local folder, quantized when ``quantization`` is given (on a GPU, onto this
    process's GPU, as TRL places k-bit models); an unreachable hub gives an error saying what to pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if quantization is not None:
        kwargs["quantization_config"] = quantization.config()
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, token=token)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, token=token, dtype=dtype, **kwargs)
    except OSError as err:
        where = "local folder" if Path(name_or_path).exists() else "hub id"
        reason = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        raise ModelLoadError(
            f"could not load model {name_or_path!r} as a {where} ({reason}). "
            "If this machine cannot reach the Hugging Face hub (offline, or HF_HUB_OFFLINE=1), pass a local folder "
            "holding config.json, the weights and the tokenizer (--model_name /path/to/model), or --model_name tiny "
            "for the offline model built from a config."
        ) from err
    if tokenizer.pad_token_id is None:
        # Gemma and Llama tokenizers may lack a pad token; padding is masked out of the loss, so EOS serves.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
