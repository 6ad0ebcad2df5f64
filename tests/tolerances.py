"""One tolerance table for every numerical comparison in the suite: (atol, rtol) per dtype.

fp32 runs are exact up to summation order. fp16/bf16 compare a low-precision run against the same math in
float64 (the oracle casts inputs up), so the bound covers the rounding of each stored intermediate. The absolute
part scales with the largest magnitude of the expected tensor (one ulp at the top of the range is the unit of
error for a low-precision sum), never below the table's value.
"""

import torch

TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-2),
    torch.bfloat16: dict(atol=1.6e-2, rtol=3e-2),
}

# Dtypes each device tests: bf16 Triton math is garbage in the CPU interpreter (docs/design.md §7), so bf16 is GPU only.
CPU_DTYPES = (torch.float32, torch.float16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, msg: str = ""):
    """assert_close with the table's tolerance for ``dtype``, widened by ``scale`` (for long reductions)."""
    tol = TOL[dtype]
    magnitude = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.float(),
        expected.float(),
        atol=tol["atol"] * scale * magnitude,
        rtol=tol["rtol"] * scale,
        msg=lambda default: f"{msg}\n{default}",
    )
