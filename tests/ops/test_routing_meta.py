"""Invariants of the expert-sorted pair list the grouped Triton path is built on."""

import pytest
import torch

from dylora_moe.kernels.routing_meta import group_by_expert


@pytest.mark.parametrize(
    "T,K,E,block",
    [
        (0, 2, 4, 16),  # no tokens: every row is padding
        (1, 1, 1, 16),  # one pair, one expert
        (37, 2, 4, 16),  # segments that end mid-block
        (64, 4, 4, 16),  # dense routing, segments exact multiples of the block
        (300, 2, 8, 64),  # many blocks per expert
        (50, 3, 7, 8),  # prime expert count
    ],
)
def test_sorted_pairs_are_a_padded_permutation(T, K, E, block):
    ids = torch.rand(T, E).argsort(dim=1)[:, :K] if T else torch.zeros(0, K, dtype=torch.long)
    ids[: T // 3] = ids[: T // 3].clamp(max=E - 2) if E > 1 else ids[: T // 3]  # skew towards low experts
    meta = group_by_expert(ids, E, block)
    rows = meta.pair_of_row
    real = rows[rows >= 0].long()
    # Every pair appears exactly once.
    assert torch.equal(real.sort().values, torch.arange(T * K))
    # Each block holds rows of its own expert only, and segments are block aligned.
    flat = ids.reshape(-1)
    offsets = meta.expert_offsets.long()
    assert offsets[0] == 0 and torch.all(offsets.diff() % block == 0) and torch.all(offsets.diff() >= 0)
    for e in range(E):
        segment = rows[offsets[e] : offsets[e + 1]]
        pairs = segment[segment >= 0].long()
        assert torch.all(flat[pairs] == e)
        assert torch.equal(pairs, pairs.sort().values)  # stable: token order kept within an expert
        assert len(pairs) == int((flat == e).sum())
        blocks = meta.expert_of_block[offsets[e] // block : offsets[e + 1] // block]
        assert torch.all(blocks == e)
    # Blocks past the last segment are marked -1 and hold only padding.
    tail = meta.expert_of_block[offsets[-1] // block :]
    assert torch.all(tail == -1)
    assert torch.all(rows[offsets[-1] :] == -1)
    # Static size: a bound of T * K and E, no data-dependent shape.
    assert rows.numel() == -(-(T * K + E * (block - 1)) // block) * block


def test_expert_without_pairs_has_an_empty_segment():
    ids = torch.tensor([[0, 2], [2, 0]])
    meta = group_by_expert(ids, 3, 4)
    assert meta.expert_offsets.tolist() == [0, 4, 4, 8]


def test_routing_meta_builds_each_piece_once_and_matches_the_plain_formulas():
    from dylora_moe.kernels.routing_meta import RoutingMeta, dense_gate

    ids = torch.tensor([[0, 2], [2, 2], [1, 0]])
    weights = torch.tensor([[0.5, 0.25], [0.125, 1.0], [2.0, 4.0]], requires_grad=True)
    meta = RoutingMeta(ids, weights, 4)
    assert meta.counts.tolist() == torch.bincount(ids.flatten(), minlength=4).tolist() == [2, 1, 3, 0]
    assert meta.gate is meta.gate and meta.blocks(4) == meta.blocks(4)
    torch.testing.assert_close(meta.gate, dense_gate(ids, weights, 4))
    assert meta.gate[1].tolist() == [0.0, 0.0, 1.125, 0.0]  # a repeated id adds its weights
    (meta.gate * torch.arange(4.0)).sum().backward()
    assert weights.grad.tolist() == [[0.0, 2.0], [2.0, 2.0], [1.0, 0.0]]
    again = RoutingMeta.from_store(meta.store)
    assert again.gate is meta.gate and again.num_experts == 4


def test_routing_meta_rejects_bad_shapes_and_ids_without_a_host_sync():
    from dylora_moe.kernels.routing_meta import RoutingMeta

    with pytest.raises(ValueError, match=r"\[T, K\]"):
        RoutingMeta(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 1), 2)
    with pytest.raises(RuntimeError, match=r"expert_ids must be in \[0, 2\)"):
        RoutingMeta(torch.tensor([[0, 2]]), torch.ones(1, 2), 2)
