"""The original's module name for :class:`~dylora_moe.modules.skills.SkillLibrary` (``from dylora_moe.skill_library
import SkillLibrary`` works as ``from dylo_moe.skill_library import SkillLibrary`` did)."""

from .modules.skills import SkillLibrary

__all__ = ["SkillLibrary"]
