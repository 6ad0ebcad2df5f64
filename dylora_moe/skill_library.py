"""The original's module name for :class:`~dylora_moe.skills.SkillLibrary` (``from dylora_moe.skill_library import
SkillLibrary`` works as ``from dylo_moe.skill_library import SkillLibrary`` did)."""

from .skills import SkillLibrary

__all__ = ["SkillLibrary"]
