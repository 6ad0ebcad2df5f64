"""The Triton MoE-LoRA entry: checks what the kernels support, picks the path (forced, or ``"auto"``: the cost
model's choice among the registered paths, paths.py) and calls its launcher."""

from __future__ import annotations

import torch

from ._launch import ACTIVATION_DTYPES, next_pow2
from .device import device_spec
from .paths import PATHS, choose_path
from .routing_meta import RoutingMeta


def moe_lora_triton(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    routing: RoutingMeta,
    scaling: float | torch.Tensor,
    dropout_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    p: float,
    base_output: torch.Tensor | None,
    path: str = "auto",
    donate_base_output: bool = False,
) -> torch.Tensor:
    """Triton MoE-LoRA on x [..., D_in] (validated by moe_lora): base_output + delta, or the delta.

    ``path`` forces a registered path ("stacked", "grouped": tests, benchmarks); "auto" picks with
    :func:`paths.choose_path`. The stacked path may write into a donated ``base_output`` (moe_lora's rules).
    """
    if x.dtype not in ACTIVATION_DTYPES or lora_a.dtype not in ACTIVATION_DTYPES:
        raise TypeError(
            f"the Triton moe_lora supports activations and weights in {ACTIVATION_DTYPES}; got x {x.dtype}, "
            f"weights {lora_a.dtype} (use backend='eager' for float64)"
        )
    if path != "auto" and path not in PATHS:
        raise ValueError(f"unknown Triton path {path!r}; expected one of {', '.join(('auto', *PATHS))}")
    num_experts, rank, d_in = lora_a.shape
    if path == "auto":
        path = choose_path(
            num_experts, rank, routing.ids.shape[1], num_tokens=next_pow2(routing.num_tokens), d_in=d_in,
            d_out=lora_b.shape[1], dtype=x.dtype, spec=device_spec(x.device), dropout=seed is not None,
        )  # fmt: skip
    return PATHS[path].launch(
        x, lora_a, lora_b, routing, scaling, dropout_mask, seed, p, base_output, donate_base_output
    )
