"""benchmarks/roofline.py: each measured Triton op row gets the cost model's roofline time for its shape and mode and
the configs its launches used (the compile numbers are left out here: tests/test_compile_report.py compiles)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import roofline  # noqa: E402
from dylora_moe.kernels import cost  # noqa: E402
from dylora_moe.kernels.device import TARGETS  # noqa: E402


def _row(mode: str, value: float, E: int = 8) -> dict:
    return dict(
        op="moe_lora",
        provider="triton",
        metric="kernel_time",
        mode=mode,
        value=value,
        dtype="bfloat16",
        x_value=f"T8192-d4096x4096-E{E}-r16-k2",
        shape=dict(T=8192, d_in=4096, d_out=4096, E=E, r=16, k=2),
    )


@pytest.mark.parametrize("target", ["sm_86", "sm_90"])
def test_table_puts_the_roofline_and_the_launched_configs_beside_each_measured_row(target):
    spec = TARGETS[target]
    lines = roofline.table([_row("fwd", 0.5), _row("full", 2.0), _row("full", 3.0, E=64)], spec, False)
    rows = [line.split(" | ") for line in lines if line.startswith("| T8192")]
    assert [r[1] for r in rows] == ["fwd", "full", "full"]
    assert [r[3] for r in rows] == ["stacked", "stacked", "grouped"]
    fwd, full = float(rows[0][5]), float(rows[1][5])
    assert 0 < fwd < full
    shape = cost.Shape(8192, 4096, 4096, 8, 16, 2, weight_bytes=2, base=False)
    want = cost.predicted_seconds(cost.stacked_costs(shape, spec), spec, shape.dtype) * 1e3
    assert full == pytest.approx(want, rel=1e-3)
    assert float(rows[1][6]) == pytest.approx(2.0 / full, rel=1e-2)  # measured / roofline
    assert "_stacked_fwd_kernel" in rows[0][7] and "_stacked_dy_kernel" not in rows[0][7]  # fwd: forward launch only
    assert rows[1][7].count("<br>") == 2 and "_grouped_weights_kernel" in rows[2][7]
