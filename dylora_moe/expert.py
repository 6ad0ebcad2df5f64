"""The original's module name for :class:`~dylora_moe.modules.experts.ExpertManager` (``from dylora_moe.expert import
ExpertManager`` works as ``from dylo_moe.expert import ExpertManager`` did)."""

from .modules.experts import ExpertManager

__all__ = ["ExpertManager"]
