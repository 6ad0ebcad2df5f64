"""The skill library and novelty detector (dylora_moe.modules.skills): the original's NoveltyDetector semantics
(issue 17): the median of the similarities to all stored skills."""

import pytest
import torch

from dylora_moe import NoveltyDetector, SkillLibrary


def _library(*skills) -> SkillLibrary:
    library = SkillLibrary(2)
    for i, skill in enumerate(skills):
        library.add_skill(i, torch.tensor(skill))
    return library


def test_median_is_over_the_similarities_to_all_skills_for_one_embedding():
    angle = torch.tensor([0.0, 0.6435, 1.3694, 3.1416])  # cosines 1, 0.8, 0.2, -1 to the query [1, 0]
    library = _library(*torch.stack([angle.cos(), angle.sin()], 1).tolist())
    query = torch.tensor([1.0, 0.0])
    median = NoveltyDetector(library, similarity_threshold=0.3, use_median=True)
    assert median.similarity(query) == pytest.approx(0.2, abs=1e-4)  # the lower middle value, as torch.median
    assert median.is_novel(query)  # 0.2 < 0.3 (the mean of the middle two, 0.5, would not be novel)
    for threshold, novel in ((0.5, True), (0.75, True), (0.95, True), (0.1, False)):
        assert NoveltyDetector(library, threshold, use_median=True).is_novel(query) is novel
        assert NoveltyDetector(library, threshold).is_novel(query) is False  # the best similarity is 1
