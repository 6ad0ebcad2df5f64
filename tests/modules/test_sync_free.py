"""A DyLoRA_MoE training step (forward + backward, padded batch) issues no host sync.

A host sync stalls the CPU until the GPU catches up: it exposes every kernel launch's latency and makes CUDA-graph
capture impossible. On the CPU there is no device to wait for, so the test watches the ops that WOULD sync on a GPU
with a TorchDispatchMode: ops whose output shape or Python value depends on tensor data (nonzero, item, bincount,
unique, boolean-mask indexing, masked_select, is_nonzero, equal, repeat_interleave without output_size, ...).

Exemptions (file, function), each a read that never happens as a host sync on a GPU:
- transformers' mask builder (``masking_utils._ignore_causal_mask_sdpa``) reads the padding mask to decide whether
  SDPA may skip the mask. It does so only in plain eager mode; under torch.compile and CUDA-graph capture it skips
  the read, so the compiled/captured step stays sync-free. It is outside this package.
- the expert-id check of the ops (``routing_meta.check_expert_ids``) reads the id range on CPU tensors only, to
  raise an IndexError naming it; on CUDA it is a device-side assert (torch._assert_async).
"""

import traceback
import warnings

import pytest
import torch
from helpers import HAS_CUDA
from moe_models import batch, randomize_experts, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

from dylora_moe import DyLoRA_MoE

aten = torch.ops.aten

SYNC_OPS = {
    aten.nonzero.default,
    aten.argwhere.default,
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.bincount.default,
    aten.masked_select.default,
    aten.repeat_interleave.Tensor,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten._unique.default,
    aten._unique2.default,
}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
HF_EXEMPT = ("masking_utils.py", "_ignore_causal_mask_sdpa")
EXEMPT = {HF_EXEMPT, ("routing_meta.py", "check_expert_ids")}


def _is_sync(func, args) -> bool:
    if func in SYNC_OPS or func.name().startswith("aten::unique"):
        return True
    if func in INDEX_OPS:  # a boolean index has a data-dependent number of elements
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


class HostSyncRecorder(TorchDispatchMode):
    """Records every op that would make the host wait for the device, with the Python frames that issued it."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_sync(func, args):
            frames = traceback.extract_stack()[:-1]
            if not any(f.filename.endswith(file) and f.name == name for f in frames for file, name in EXEMPT):
                ours = [f for f in frames if "/dylora_moe/" in f.filename or "/kernels/" in f.filename]
                where = ["/".join(f.filename.rsplit("/", 2)[-2:]) + f":{f.lineno} {f.name}" for f in ours]
                self.syncs.append((func.name(), where))
        return func(*args, **(kwargs or {}))

    def from_model_code(self):
        """The syncs issued by the model/router/layer code itself, not inside the ops (dylora_moe.kernels)."""
        return [(op, where) for op, where in self.syncs if not where or "kernels" not in where[-1]]


def padded_batch():
    """Row 1 right-padded, row 2 left-padded, row 3 all padding."""
    input_ids, mask, _ = batch(rows=4, length=6)
    mask[2, :2] = 0
    mask[3] = 0
    input_ids = input_ids.masked_fill(mask == 0, 0)
    return input_ids, mask, input_ids.masked_fill(mask == 0, -100)


def build(routing, backend, **kw):
    moe = DyLoRA_MoE(
        tiny_llama(layers=1), num_experts=3, lora_r=4, lora_alpha=8, lora_dropout=0.1, kernel=backend,
        routing=routing, top_k=2, z_loss_coefficient=1e-3, **kw,
    ).train()  # fmt: skip
    randomize_experts(moe.handle.layers.values())
    return moe


def step(moe, inputs):
    moe.zero_grad(set_to_none=True)
    out = moe(*inputs)
    out.loss.backward()
    return out


ROUTINGS = [
    pytest.param("token", {}, id="token"),
    pytest.param("sequence", {"sequence_top_k": 2}, id="sequence-top2"),
    pytest.param("token", {"balance_loss": "switch"}, id="token-switch"),
    pytest.param("token", {"balance_loss": "mse", "global_balance": True}, id="token-mse-global"),
]


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("routing, kw", ROUTINGS)
def test_training_step_issues_no_host_sync(routing, kw, backend):
    moe = build(routing, backend, **kw)
    inputs = padded_batch()
    step(moe, inputs)  # warm-up: one-time reads (the router's maturity flag after the constructor set it)
    with HostSyncRecorder() as recorder:
        out = step(moe, inputs)
    assert torch.isfinite(out.loss)
    assert recorder.syncs == [], f"host syncs in a training step: {recorder.syncs}"


def test_loss_free_bias_step_issues_no_host_sync():
    moe = build("token", "eager", balance_loss="loss_free")
    step(moe, padded_batch())
    with HostSyncRecorder() as recorder:
        moe.balance_step()
    assert recorder.syncs == [] and moe.router.selection_bias.abs().sum() > 0


def test_recorder_catches_what_it_must():
    """The recorder is not vacuous: the old routing code's ops, and sequence routing without sequence_top_k (one
    documented ``nonzero`` for its variable number of (sequence, expert) pairs), are caught."""
    x, mask = torch.randn(4, 3), torch.tensor([True, False, True, True])
    with HostSyncRecorder() as recorder:
        x[mask]
        mask.nonzero()
        torch.bincount(torch.tensor([0, 1, 1]))
        bool(x.sum() > 0)
        torch.unique(torch.tensor([1, 1, 2]))
        x.repeat_interleave(torch.tensor([1, 2, 0, 1]), dim=0)
    ops = [op for op, _ in recorder.syncs]
    assert ops[0] == "aten::index.Tensor" and "aten::nonzero" in ops and "aten::bincount" in ops
    assert any(op.startswith("aten::_unique") or op.startswith("aten::unique") for op in ops)
    assert "aten::_local_scalar_dense" in ops or "aten::is_nonzero" in ops
    assert "aten::repeat_interleave.Tensor" in ops

    moe = build("sequence", "triton")
    inputs = padded_batch()
    step(moe, inputs)
    with HostSyncRecorder() as recorder:
        step(moe, inputs)
    assert [op for op, _ in recorder.from_model_code()] == ["aten::nonzero"]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (CUDA's own sync detector, set_sync_debug_mode)")
@pytest.mark.parametrize("routing, kw", ROUTINGS)
def test_training_step_on_gpu_under_sync_debug_mode(routing, kw):
    """The same on a GPU with CUDA's own detector (sync debug mode 'warn'; transformers' mask read exempted)."""
    moe = build(routing, "triton", **kw).cuda()
    inputs = [t.cuda() for t in padded_batch()]
    step(moe, inputs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(moe, inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message) and not w.filename.endswith(HF_EXEMPT[0])]
    assert syncs == [], [f"{w.filename}:{w.lineno}" for w in syncs]
