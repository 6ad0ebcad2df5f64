"""The original's module name for :class:`~dylora_moe.modules.skills.NoveltyDetector` (``from
dylora_moe.novelty_detector import NoveltyDetector`` works as
``from dylo_moe.novelty_detector import NoveltyDetector`` did)."""

from .modules.skills import NoveltyDetector

__all__ = ["NoveltyDetector"]
