"""Routing metadata: everything the MoE-LoRA ops derive from (expert ids, routing weights), built once per step.

Shape letters: T tokens, K experts per token, E experts, P = T * K (token, slot) pairs.

A model builds one :class:`RoutingMeta` per forward (through ``dylora_moe.modules.routing.Routing.meta``) and every
MoE-LoRA layer, forward and backward, reads the same tensors: the dense gate, the per-expert counts and the
grouped path's sort are computed at most once per step. Nothing here syncs with the host: sizes are static bounds
of T, K and E, and the id range check is a device-side assert.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def dense_gate(expert_ids: torch.Tensor, expert_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter the k routing weights of each token into a dense [T, E] gate (weights of a repeated id add up).

    Differentiable in expert_weights; float32 (float64 for float64 weights) so a bf16 weight sum is not rounded
    twice.
    """
    dtype = torch.float64 if expert_weights.dtype == torch.float64 else torch.float32
    gate = expert_weights.new_zeros(expert_ids.shape[0], num_experts, dtype=dtype)
    return gate.scatter_add(1, expert_ids.long(), expert_weights.to(dtype))


class _SharedGate(torch.autograd.Function):
    """dense_gate for the per-step cache. The ids are kept on ctx rather than saved with save_for_backward: the gate
    is built inside whichever layer runs first, possibly in an activation-checkpointed region, whose recomputation
    finds it cached and must see the same saved tensors as the original forward (none from this op)."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
        ctx.ids, ctx.weights_dtype = ids.long(), weights.dtype
        return dense_gate(ids, weights.detach(), num_experts)

    @staticmethod
    def backward(ctx, grad_gate: torch.Tensor):
        return None, grad_gate.gather(1, ctx.ids).to(ctx.weights_dtype), None


def _versions(ids: torch.Tensor, weights: torch.Tensor) -> tuple[int, int] | None:
    """Version counters of the routing tensors (shared with every view of them); None under torch.compile and for
    inference tensors, which have none."""
    if torch.compiler.is_compiling() or ids.is_inference() or weights.is_inference():
        return None
    return ids._version, weights._version


def _same_memory(given: torch.Tensor, flat: torch.Tensor) -> bool:
    """Whether ``given`` [..., K] is ``flat`` [T, K] or views the same elements in the same layout (its reshape)."""
    if given is flat:
        return True
    if given.dtype != flat.dtype or given.device != flat.device or given.numel() != flat.numel() or given.dim() < 1:
        return False
    try:
        view = given.view(-1, given.shape[-1])  # metadata only; fails where a reshape would copy
    except RuntimeError:
        return False
    return view.shape == flat.shape and view.stride() == flat.stride() and view.data_ptr() == flat.data_ptr()


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: how many (token, slot) pairs picked each expert (a scatter_add, no host sync like bincount)."""
    flat = expert_ids.reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def check_expert_ids(expert_ids: torch.Tensor, num_experts: int, sync_free: bool = False) -> None:
    """Refuse ids outside [0, E) on every backend.

    CPU tensors in eager mode get an IndexError naming the range found, unless ``sync_free``; elsewhere (CUDA,
    torch.compile, ``sync_free``) a device-side assert (torch._assert_async) fails with the same message as a
    RuntimeError, without a host sync.
    """
    if expert_ids.numel() == 0:
        return
    message = f"expert_ids must be in [0, {num_experts}) (the number of experts)"
    if expert_ids.device.type == "cpu" and not sync_free and not torch.compiler.is_compiling():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= num_experts:
            raise IndexError(f"{message}; found values in [{lo}, {hi}]")
        return
    in_range = ((expert_ids >= 0) & (expert_ids < num_experts)).all()
    torch._assert_async(in_range, message)


class ExpertBlocks(NamedTuple):
    """(token, slot) pairs sorted by expert, each expert's segment padded to a whole number of blocks.

    A pair is p = t * K + j. Only the index list is padded, never the activations, and every size is a static
    bound of T * K and E, so building it needs no host sync (CUDA graphs and torch.compile stay whole).

    pair_of_row:     [P_pad] int32, the pair in each sorted row; -1 for padding rows.
    expert_of_block: [P_pad / BLOCK] int32, the expert whose rows a block holds; -1 for blocks past the end.
    expert_offsets:  [E + 1] int32, first padded row of each expert's segment (the last entry ends the last one).
    """

    pair_of_row: torch.Tensor
    expert_of_block: torch.Tensor
    expert_offsets: torch.Tensor


def padded_rows(num_pairs: int, num_experts: int, block: int) -> int:
    """Static size of the padded sorted pair list."""
    return (num_pairs + num_experts * (block - 1) + block - 1) // block * block


def group_by_expert(
    expert_ids: torch.Tensor, num_experts: int, block: int, counts: torch.Tensor | None = None
) -> ExpertBlocks:
    """Sort the pairs of ``expert_ids`` [T, K] by expert (stable: pairs keep token order within an expert)."""
    flat = expert_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = flat.device
    order = torch.argsort(flat, stable=True)
    counts = expert_counts(flat, num_experts) if counts is None else counts
    padded = (counts + block - 1) // block * block
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    sorted_expert = flat[order]
    rank_in_expert = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_expert]
    total_rows = padded_rows(num_pairs, num_experts, block)
    pair_of_row = torch.full((total_rows,), -1, dtype=torch.int32, device=device)
    pair_of_row = pair_of_row.index_put((padded_start[sorted_expert] + rank_in_expert,), order.to(torch.int32))
    block_start = torch.arange(0, total_rows, block, device=device)
    expert_of_block = torch.searchsorted(padded_end, block_start, right=True)
    expert_of_block = torch.where(expert_of_block < num_experts, expert_of_block, -1).to(torch.int32)
    expert_offsets = torch.cat([padded_start.new_zeros(1), padded_end]).to(torch.int32)
    return ExpertBlocks(pair_of_row, expert_of_block, expert_offsets)


class RoutingMeta:
    """Per-step routing metadata of flat ``ids`` / ``weights`` [T, K] over ``num_experts``, each piece built on
    first use and cached (so L layers x forward + backward build it once).

    ``gate`` [T, E] float32: the dense scatter of the weights (differentiable: its gradient from every layer
    flows back to ``weights`` through one scatter). ``counts`` [E]: pairs per expert. ``blocks(block)``: the
    grouped path's padded sort. The ids are checked against [0, E) once, when the metadata is built, by a
    device-side assert (a RuntimeError; no host sync, so a training step stays sync-free on every device).

    The cache is a plain dict (``store``) so that torch.compile can keep it on an object that outlives the
    compiled region (dylora_moe.modules.routing.Routing); :meth:`from_store` wraps an existing one.
    """

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor, num_experts: int, check_ids: bool = True):
        if ids.dim() != 2 or ids.shape != weights.shape:
            raise ValueError(f"routing ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be [T, K]")
        if check_ids:
            check_expert_ids(ids, num_experts, sync_free=True)
        self.store = {"ids": ids, "weights": weights, "num_experts": num_experts, "versions": _versions(ids, weights)}

    @classmethod
    def from_store(cls, store: dict) -> RoutingMeta:
        meta = cls.__new__(cls)
        meta.store = store
        return meta

    @property
    def ids(self) -> torch.Tensor:
        return self.store["ids"]

    @property
    def weights(self) -> torch.Tensor:
        return self.store["weights"]

    @property
    def num_experts(self) -> int:
        return self.store["num_experts"]

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    def check_built_from(self, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Raise a ValueError unless this metadata was built from ``ids`` and ``weights`` [..., K] (these tensors,
        or flat views of their memory) as they are now: metadata of other routing, or cached before an in-place
        change, would silently override them. Identity, data pointers and version counters: no host sync. Not
        checked under torch.compile (which traces the layers' own metadata)."""
        if torch.compiler.is_compiling():
            return
        same = _same_memory(ids, self.ids) and _same_memory(weights, self.weights)
        if not same:
            raise ValueError(
                "routing= was built from other expert_ids/expert_weights than the ones passed with it (stale "
                "metadata would override them); build it from these: RoutingMeta(ids.reshape(-1, k), "
                "weights.reshape(-1, k), num_experts), or pass routing=None"
            )
        built = self.store.get("versions")
        if built is not None and built != _versions(self.ids, self.weights):
            raise ValueError(
                "expert_ids or expert_weights changed in place after their routing= metadata was built (its cached "
                "gate and sort are stale); build the metadata again after the change"
            )

    @property
    def gate(self) -> torch.Tensor:
        if "gate" not in self.store:
            self.store["gate"] = _SharedGate.apply(self.ids, self.weights, self.num_experts)
        return self.store["gate"]

    @property
    def counts(self) -> torch.Tensor:
        if "counts" not in self.store:
            self.store["counts"] = expert_counts(self.ids, self.num_experts)
        return self.store["counts"]

    def blocks(self, block: int) -> ExpertBlocks:
        key = f"blocks_{block}"
        if key not in self.store:
            self.store[key] = tuple(group_by_expert(self.ids, self.num_experts, block, self.counts))
        return ExpertBlocks(*self.store[key])
