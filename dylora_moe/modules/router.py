"""DynamicHybridRouter (the original's API) on the fused top-k op, and the auxiliary router losses.

Shape letters: T tokens, E experts, k experts per token, H router input width.

Routing rule (the original's, docs/design.md §2): while any expert is immature (maturity 0) every token uses all
experts with ``softmax(logits / temperature)``; once all are mature, each token keeps its top-k experts, weighted by

  - ``weighting="original"``: softmax over the k selected logits, no temperature (the original). With k = 1 the
    weight is the constant 1, so the language-model loss gives the gate no gradient.
  - ``weighting="softmax"``: the k largest probabilities of the full tempered softmax, renormalised over the k
    when ``renormalize`` (Switch/Mixtral). Without renormalisation k = 1 trains the gate.

Auxiliary-loss-free balancing (``use_selection_bias``, :mod:`dylora_moe.modules.balance`): the top-k is taken of
``logits / temperature + selection_bias`` (a log-prior per expert), while the weights stay those of the unbiased
logits. The bias moves only in :meth:`DynamicHybridRouter.balance_step`, after each optimizer step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import BALANCE_FORMS, WEIGHTING_FORMS, WEIGHTINGS, check_setting
from ..io.original_files import is_safetensors_file, load_torch_file, require_keys
from ..kernels import topk_route
from .balance import bias_update, global_mse_loss, global_switch_loss, split_window, summed_over_ranks, window_row
from .growth import keep_parameter_identity

ORIGINAL_ROUTER_KEYS = ("gate_state_dict", "expert_maturity", "num_experts", "input_size", "top_k", "temperature")


@dataclass
class RouterOutput:
    """One routing decision for T tokens: ``logits`` [T, E]; ``ids``/``weights`` [T, k] (k = E in dense mode);
    ``dense`` [T, E] the scattered weights; ``counts`` [E] tokens per expert; ``mean_prob`` [E] mean of the tempered
    softmax (Switch loss); ``dense_mode`` whether the dense (immature) rule was used; ``mask`` [T] bool, the routed
    tokens when the router was given a mask (the rest are padding: weight 0, left out of counts, mean_prob and the
    losses), None when every token was routed."""

    logits: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    dense: torch.Tensor
    counts: torch.Tensor
    mean_prob: torch.Tensor
    dense_mode: bool
    mask: torch.Tensor | None = None


class DynamicHybridRouter(nn.Module):
    """Gate ``nn.Linear(input_size, num_experts)`` with per-expert maturity; dense while any expert is new, top-k after.

    Extra keywords: ``weighting`` ("softmax", the default | "original"), ``renormalize`` (for "softmax"),
    ``backend`` of the fused router op ("auto" | "triton" | "eager"). The original's sparse rule, whose k = 1 weight
    gives the gate no gradient, is ``weighting="original"`` (see the module docstring).

    Balancing state (set by the model): ``use_selection_bias`` (loss-free balancing on), ``update_rate`` u of the
    bias, ``track_load`` (count the load of training forwards into the step's window). The buffer
    ``selection_bias`` [E] is saved with the router; the window is a plain attribute (not a buffer: DDP would
    overwrite each rank's count with rank 0's at every forward).
    """

    def __init__(
        self,
        input_size: int,
        num_experts: int,
        top_k: int = 1,
        temperature: float = 2.0,
        *,
        weighting: str = "softmax",
        renormalize: bool = False,
        backend: str = "auto",
    ):
        """A gate ``Linear(input_size, num_experts)`` picking ``top_k`` experts per token at ``temperature`` (the
        original's arguments); ``weighting`` / ``renormalize`` as the class docstring says; ``backend`` runs the
        fused top-k op ("auto" | "triton" | "eager")."""
        super().__init__()
        check_setting("num_experts", num_experts)
        check_setting("top_k", top_k, num_experts=num_experts)
        check_setting("temperature", temperature)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
        self.input_size = input_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.temperature = float(temperature)
        self.weighting = weighting
        self.renormalize = bool(renormalize)
        self.backend = backend
        self.gate = nn.Linear(input_size, num_experts)
        self.register_buffer("expert_maturity", torch.zeros(num_experts))
        self.register_buffer("selection_bias", torch.zeros(num_experts))
        self.use_selection_bias, self.update_rate, self.track_load = False, 0.05, False
        self.load_window: torch.Tensor | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Routers saved before loss-free balancing have no selection bias: they load with a zero bias.
        state_dict.setdefault(prefix + "selection_bias", torch.zeros_like(self.selection_bias))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def all_mature(self) -> bool:
        """Whether every expert is mature, from a host-side flag (reading the buffer every step would be a host sync).

        The flag is refreshed by :meth:`set_expert_maturity`, :meth:`add_expert` and :meth:`refresh_maturity`, and
        in eager mode also whenever the ``expert_maturity`` buffer changed some other way (``fill_``,
        ``load_state_dict``, ``.to()``: its version counter moved), at the cost of one read then. Under
        ``torch.compile`` the flag is read as it is (the graph can read neither the buffer nor its version): after
        editing the buffer directly, call :meth:`refresh_maturity` (``DyLoRA_MoE.train()`` and ``.compile()`` do).
        """
        if torch.compiler.is_compiling():
            if "_all_mature" not in self.__dict__:
                raise RuntimeError(
                    "the router's maturity flag was never read; call router.refresh_maturity() (or "
                    "DyLoRA_MoE.train() / .compile(), which do) before the compiled forward"
                )
            return self._all_mature
        self.refresh_maturity_if_changed()
        return self._all_mature

    def refresh_maturity_if_changed(self) -> None:
        """Re-read ``expert_maturity`` only when the buffer was replaced or edited since the last read (its version
        counter moved): no host read in the common case."""
        seen = self.__dict__.get("_maturity_seen")
        buffer = self.expert_maturity
        if seen is None or seen[0] is not buffer or seen[1] != buffer._version:
            self.refresh_maturity()

    def refresh_maturity(self) -> None:
        """Re-read ``expert_maturity`` into the host-side flag :attr:`all_mature` uses (one host read)."""
        buffer = self.expert_maturity
        self._all_mature = bool((buffer > 0).all())
        self._maturity_seen = (buffer, buffer._version)

    def route(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        """Route the tokens of ``x`` [..., H] (flattened to [T, H]).

        ``mask`` (optional, bool or 0/1 with the leading dims of ``x``) marks the tokens to route; the others
        (padding) get weight 0 and are left out of ``counts``, ``mean_prob`` and the auxiliary losses. Routing
        every position and masking keeps every shape static: no ``x[mask]``, so no host sync.
        Non-finite logits of routed tokens fail a device-side assert (``torch._assert_async``: no host sync on a
        GPU, where it aborts the CUDA context; on the CPU it raises a RuntimeError at once).
        """
        x = x.reshape(-1, x.shape[-1]).to(self.gate.weight.dtype)
        keep = None if mask is None else mask.reshape(-1, 1).bool()
        if keep is not None:
            # Padding positions route a zero vector: whatever the base model left there (even NaN) cannot reach the
            # gate's gradient or the statistics.
            x = torch.where(keep, x, 0.0)
        logits = self.gate(x)
        torch._assert_async(
            torch.isfinite(logits).all(),
            "router logits contain NaN or Inf; check the gate weights and the hidden states feeding it",
        )
        dense_mode = not self.all_mature
        if dense_mode:
            # k = E of the tempered softmax without renormalisation is the dense softmax itself.
            k, temperature, normalize = self.num_experts, self.temperature, False
        elif WEIGHTING_FORMS[self.weighting].tempered:
            k, temperature, normalize = self.top_k, self.temperature, self.renormalize
        else:
            # The original, literally: the fused op picks the top-k (of the logits: temperature 1), then the weights
            # are a softmax over the k selected logits, whose gradient is exactly 0 at k = 1.
            k, temperature, normalize = self.top_k, 1.0, True
        of_selected_logits = not dense_mode and not WEIGHTING_FORMS[self.weighting].tempered
        biased = self.use_selection_bias and not dense_mode
        # Loss-free balancing: the op selects on biased logits (top-k of logits / tau + bias for either weighting);
        # the weights, dense gate and mean probability are then taken of the unbiased logits here.
        select = (logits + self.temperature * self.selection_bias.to(logits.dtype)).detach() if biased else logits
        res = topk_route(
            select, k, temperature=temperature, normalize=normalize, backend=self.backend, check_finite=False
        )
        weights, dense, counts, mean_prob = res.weights, res.dense, res.counts, res.mean_prob
        if biased:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            mean_prob = probs.mean(0)
            if not of_selected_logits:  # those take their weights of the selected logits just below
                weights = probs.gather(1, res.ids)
                if normalize:
                    weights = weights / weights.sum(-1, keepdim=True)
                dense = torch.zeros_like(probs).scatter(1, res.ids, weights)
        if of_selected_logits:
            weights = torch.softmax(logits.gather(1, res.ids).float(), dim=-1)
            dense = torch.zeros_like(res.dense).scatter(1, res.ids, weights)
        if keep is not None:
            # torch.where, not a product: a padding position's NaN must not leak into its weight 0.
            weights = torch.where(keep, weights, 0.0)
            dense = torch.where(keep, dense, 0.0)
            picks = keep.expand_as(res.ids).to(counts.dtype)
            counts = torch.zeros_like(counts).scatter_add(0, res.ids.reshape(-1), picks.reshape(-1))
            probs = torch.where(keep, torch.softmax(logits.float() / temperature, dim=-1), 0.0)
            mean_prob = probs.sum(0) / keep.sum().clamp_min(1)
        if self.training and self.track_load:
            tokens = keep.sum() if keep is not None else torch.tensor(logits.shape[0], device=logits.device)
            self._window(logits.device).add_(window_row(counts, dense, tokens))
        return RouterOutput(
            logits, res.ids, weights, dense, counts, mean_prob, dense_mode, None if keep is None else keep[:, 0]
        )

    def _window(self, device) -> torch.Tensor:
        """The step's load window [2E + 1] (see :mod:`~dylora_moe.modules.balance`), made when missing or stale."""
        window = self.load_window
        if window is None or window.shape[0] != 2 * self.num_experts + 1 or window.device != torch.device(device):
            window = self.load_window = torch.zeros(2 * self.num_experts + 1, device=device)
        return window

    def global_window(self) -> torch.Tensor:
        """The window so far (this micro-batch included), summed over data-parallel ranks."""
        return summed_over_ranks(self._window(self.gate.weight.device))

    @torch.no_grad()
    def balance_step(self) -> None:
        """After an optimizer step: with ``use_selection_bias``, move the bias by ``update_rate`` toward equal load
        (the window's picks summed over ranks; on the device, no host sync); then start a new window."""
        window = self._window(self.gate.weight.device)
        if self.use_selection_bias and self.update_rate > 0:
            picks, _, _ = split_window(summed_over_ranks(window), self.num_experts)
            self.selection_bias.copy_(bias_update(self.selection_bias, picks, self.update_rate))
        window.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights with the shape of ``x`` but last dim ``num_experts`` (the original's output)."""
        return self.route(x).dense.reshape(*x.shape[:-1], self.num_experts)

    @torch.no_grad()
    def add_expert(self, device=None) -> int:
        """Grow the gate by one output (old rows kept, the new row initialised like nn.Linear); returns its id."""
        old = self.gate
        device = old.weight.device if device is None else device
        new = nn.Linear(self.input_size, self.num_experts + 1, device=device, dtype=old.weight.dtype)
        new.weight[: self.num_experts].copy_(old.weight)
        new.bias[: self.num_experts].copy_(old.bias)
        new.requires_grad_(old.weight.requires_grad)  # a frozen gate stays frozen as it grows
        before = dict(self.named_parameters())
        self.gate = new
        keep_parameter_identity(self, before)  # an optimizer built before keeps training the gate
        self.expert_maturity = torch.cat([self.expert_maturity.to(device), torch.zeros(1, device=device)])
        self.selection_bias = torch.cat([self.selection_bias.to(device), torch.zeros(1, device=device)])
        self.load_window = None  # one more expert: a new window
        self.num_experts += 1
        self.refresh_maturity()
        return self.num_experts - 1

    def set_expert_maturity(self, expert_id: int, maturity: float) -> None:
        if not 0 <= expert_id < self.num_experts:
            raise IndexError(f"expert {expert_id} is out of range for {self.num_experts} experts")
        self.expert_maturity[expert_id] = float(maturity)
        self.refresh_maturity()

    def config(self) -> dict:
        return {
            "input_size": self.input_size,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "weighting": self.weighting,
            "renormalize": self.renormalize,
        }

    def save(self, path, original_format: bool = False) -> None:
        """One safetensors file: gate weight/bias and maturity, with the constructor arguments in its metadata.

        ``original_format=True`` writes the original's ``torch.save`` dict instead (readable by the original code;
        it has no field for ``weighting``/``renormalize``, which the original did not have)."""
        if original_format:
            torch.save(self._original_state(), str(path))
            return
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"config": json.dumps(self.config())})

    def _original_state(self) -> dict:
        gate = {k: v.detach().cpu() for k, v in self.gate.state_dict().items()}
        return {
            "gate_state_dict": gate,
            "expert_maturity": self.expert_maturity.detach().cpu(),
            "num_experts": self.num_experts,
            "input_size": self.input_size,
            "top_k": self.top_k,
            "temperature": self.temperature,
        }

    @classmethod
    def load(cls, path, device=None) -> DynamicHybridRouter:
        """Read a router saved by :meth:`save` (safetensors) or by the original (a ``torch.save`` dict, read with
        ``weights_only=True``; the router then uses ``weighting="original"``). The file format is told by content."""
        router = cls._load_safetensors(path) if is_safetensors_file(path) else cls._load_original(path)
        return router.to(device) if device is not None else router

    @classmethod
    def _load_safetensors(cls, path) -> DynamicHybridRouter:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path} is not a DynamicHybridRouter file (no 'config' in its safetensors metadata)")
        router = cls(**json.loads(meta["config"]))
        router.load_state_dict(load_file(str(path)))
        return router

    @classmethod
    def _load_original(cls, path) -> DynamicHybridRouter:
        state = load_torch_file(path)
        require_keys(state, ORIGINAL_ROUTER_KEYS, path, "DynamicHybridRouter (original torch.save)")
        router = cls(
            int(state["input_size"]), int(state["num_experts"]), int(state["top_k"]), float(state["temperature"]),
            weighting="original",
        )  # fmt: skip
        gate = state["gate_state_dict"]
        require_keys(gate, ("weight", "bias"), path, "DynamicHybridRouter gate_state_dict")
        maturity = torch.as_tensor(state["expert_maturity"], dtype=torch.float32).reshape(-1)
        expected = (router.num_experts, router.input_size)
        if tuple(gate["weight"].shape) != expected or maturity.numel() != router.num_experts:
            raise ValueError(
                f"{path}: gate weight {tuple(gate['weight'].shape)} and maturity of {maturity.numel()} experts do not "
                f"match num_experts={router.num_experts}, input_size={router.input_size} (expected {expected})"
            )
        router.gate.load_state_dict({"weight": gate["weight"], "bias": gate["bias"]})
        router.expert_maturity.copy_(maturity)
        return router


def _token_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 0 of ``values`` [T, ...] over the routed tokens (``mask`` [T] bool, None: all); 0 if none."""
    if mask is None:
        return values.mean(0) if values.shape[0] else values.sum(0) * 0.0
    keep = mask.reshape(-1, *([1] * (values.dim() - 1)))
    return torch.where(keep, values, 0.0).sum(0) / mask.sum().clamp_min(1)


def balance_loss(route: RouterOutput, form: str = "mse", window: torch.Tensor | None = None) -> torch.Tensor | None:
    """Load-balancing loss over the routed (non-padding) tokens; 0 when there are none; None for the forms without
    a loss ("loss_free": the router's selection bias balances; "none").

    ``"mse"`` (the original): mean over experts of (mean routing weight - 1/E)^2.
    ``"switch"``: E * sum_e f_e * P_e, f_e the fraction of (token, slot) picks of expert e, P_e its mean probability.
    ``window`` (global-batch balancing): the router's load window summed over ranks; the mean weight ("mse") or f_e
    ("switch") is then counted over it (:mod:`~dylora_moe.modules.balance`).
    """
    if form not in BALANCE_FORMS:
        raise ValueError(f"unknown balance loss {form!r}; expected 'mse', 'switch', 'loss_free' or 'none'")
    if not BALANCE_FORMS[form].loss:
        return None
    if route.dense.shape[0] == 0:
        return route.dense.sum() * 0.0
    local, global_batch = BALANCE_LOSS_MATH[form]
    num_experts = route.dense.shape[-1]
    return local(route, num_experts) if window is None else global_batch(route, window, num_experts)


def _mse_loss(route: RouterOutput, num_experts: int) -> torch.Tensor:
    loss = ((_token_mean(route.dense, route.mask) - 1.0 / num_experts) ** 2).mean()
    return loss if route.mask is None else torch.where(route.mask.any(), loss, 0.0)


def _switch_loss(route: RouterOutput, num_experts: int) -> torch.Tensor:
    picks = route.counts.to(route.mean_prob.dtype)
    return num_experts * (picks / picks.sum().clamp_min(1) * route.mean_prob).sum()


# The math of each balance form with a loss (dylora_moe.config.BALANCE_FORMS): (over this batch, over the window).
BALANCE_LOSS_MATH = {
    "mse": (_mse_loss, lambda route, window, e: global_mse_loss(window, route.dense.sum(0), e)),  # padding: weight 0
    "switch": (_switch_loss, lambda route, window, e: global_switch_loss(window, route.mean_prob, e)),
}


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over the routed tokens (``mask`` [T], None: all) of logsumexp(logits)^2."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return _token_mean(torch.logsumexp(logits.float(), dim=-1) ** 2, mask)


def router_entropy(route: RouterOutput) -> torch.Tensor:
    """Mean entropy (nats) of the per-token routing weights over the routed tokens: log E for uniform, 0 for one
    expert."""
    entropy = -(route.dense * route.dense.clamp_min(1e-12).log()).sum(-1)
    return _token_mean(entropy, route.mask)
