"""Load balancing of the router: the load counted over an optimizer step, the global-batch losses and the
auxiliary-loss-free selection bias.

Shape letters: E experts, T tokens.

Load window: while training, the router adds each micro-batch's load to a window ``[picks (E), routing weight (E),
routed tokens (1)]`` on the device (no host sync). :func:`balance_step`, called once after each optimizer step,
sums the window over data-parallel ranks (``torch.distributed``, when initialised), uses it, and starts a new one.
So the load of one step is counted over every micro-batch of the gradient-accumulation window and every rank.

- Auxiliary-loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
  Mixture-of-Experts"; DeepSeek-V3): a per-expert bias b is added to the routing scores for the top-k SELECTION only
  (the gate weights stay the unbiased softmax), and after each optimizer step
  ``b_e += u * sign(mean_e' load_e' - load_e)``: under-loaded experts become easier to pick, over-loaded ones harder.
  The balancing costs no gradient, so it does not fight the language-model loss.
- Global-batch balancing for the auxiliary losses (Qiu et al. 2025, "Demons in the Detail"): the load term of the
  loss (Switch: the pick fractions f_e; MSE: the mean routing weights) is counted over the window so far, all ranks
  summed, instead of over the micro-batch; the gradient still flows through this micro-batch's own routing only.
  Balance is then asked of the whole batch, so a domain may keep its own experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def window_row(counts: torch.Tensor, dense: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """One micro-batch's load ``[picks (E), routing weight (E), tokens (1)]`` in float32 (detached)."""
    return torch.cat([counts.float(), dense.detach().float().sum(0), tokens.float().reshape(1)])


def summed_over_ranks(window: torch.Tensor) -> torch.Tensor:
    """``window`` summed over the data-parallel ranks (a copy), or itself without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return window
    total = window.clone()
    dist.all_reduce(total)
    return total


def split_window(window: torch.Tensor, num_experts: int):
    """(picks [E], routing weight [E], tokens []) of a window."""
    return window[:num_experts], window[num_experts : 2 * num_experts], window[2 * num_experts]


def bias_update(selection_bias: torch.Tensor, picks: torch.Tensor, rate: float) -> torch.Tensor:
    """The loss-free step: ``bias + rate * sign(mean(picks) - picks)`` (a new tensor)."""
    return selection_bias + rate * torch.sign(picks.mean() - picks).to(selection_bias.dtype)


def global_mse_loss(window: torch.Tensor, local_weight: torch.Tensor, num_experts: int) -> torch.Tensor:
    """MSE balance loss on the window's mean routing weight: mean_e (W_e / N - 1/E)^2, where W (summed over the
    window and the ranks, this micro-batch included) carries the gradient of this micro-batch's weight sums
    ``local_weight`` [E] only."""
    _, weight, tokens = split_window(window, num_experts)
    weight = weight + (local_weight - local_weight.detach())
    return ((weight / tokens.clamp_min(1) - 1.0 / num_experts) ** 2).mean()


def global_switch_loss(window: torch.Tensor, mean_prob: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch loss with global pick fractions: E * sum_e f_e * P_e, f_e from the window (all ranks, this micro-batch
    included), P_e this micro-batch's mean probability (the gradient)."""
    picks, _, _ = split_window(window, num_experts)
    return num_experts * (picks / picks.sum().clamp_min(1) * mean_prob).sum()
