"""SkillLibrary and NoveltyDetector: the small growth machinery of the original (DESIGN 2).

A skill is an embedding (the mean last hidden state of the base model over some data) tied to the expert made for
it; data is novel when its embedding is not close (cosine similarity) to any stored skill.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SkillLibrary:
    """Stored skill embeddings [N, embedding_size] and the expert id of each."""

    def __init__(self, embedding_size: int):
        self.embedding_size = embedding_size
        self.embeddings = torch.empty(0, embedding_size)
        self.expert_ids: list[int] = []

    def __len__(self) -> int:
        return len(self.expert_ids)

    def add_skill(self, embedding: torch.Tensor, expert_id: int) -> None:
        embedding = embedding.detach().float().reshape(-1).cpu()
        if embedding.numel() != self.embedding_size:
            raise ValueError(f"skill embedding has {embedding.numel()} values, expected {self.embedding_size}")
        self.embeddings = torch.cat([self.embeddings, embedding[None]])
        self.expert_ids.append(int(expert_id))

    def similarities(self, embedding: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of ``embedding`` to every stored skill, [N]."""
        query = embedding.detach().float().reshape(1, -1).cpu()
        if query.shape[1] != self.embedding_size:
            raise ValueError(f"query embedding has {query.shape[1]} values, expected {self.embedding_size}")
        return F.cosine_similarity(self.embeddings, query, dim=-1) if len(self) else torch.empty(0)

    def closest(self, embedding: torch.Tensor) -> tuple[int | None, float]:
        """(expert id, similarity) of the most similar skill, or (None, -1.0) for an empty library."""
        sims = self.similarities(embedding)
        if sims.numel() == 0:
            return None, -1.0
        best = int(sims.argmax())
        return self.expert_ids[best], float(sims[best])


class NoveltyDetector:
    """Data is novel when its best cosine similarity to the library is below ``threshold`` (or the library is empty)."""

    def __init__(self, skill_library: SkillLibrary, threshold: float = 0.9):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        self.skill_library = skill_library
        self.threshold = threshold

    def is_novel(self, embedding: torch.Tensor) -> bool:
        return self.skill_library.closest(embedding)[1] < self.threshold
