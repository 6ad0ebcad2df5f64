"""The original's module name for :class:`~dylora_moe.modules.router.DynamicHybridRouter` (``from dylora_moe.router
import DynamicHybridRouter`` works as ``from dylo_moe.router import DynamicHybridRouter`` did)."""

from .modules.router import DynamicHybridRouter, RouterOutput, balance_loss, router_entropy, z_loss

__all__ = ["DynamicHybridRouter", "RouterOutput", "balance_loss", "router_entropy", "z_loss"]
