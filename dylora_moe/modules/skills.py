"""SkillLibrary and NoveltyDetector: the small growth machinery of the original, with its signatures.

A skill is an embedding (the mean last hidden state of the base model over some data) stored under the id of the
expert made for it; data is novel when its embedding is not close (cosine similarity) to any stored skill.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..io.original_files import is_safetensors_file, load_torch_file


class SkillLibrary:
    """Skill embeddings ``skill_embeddings`` {skill id: [embedding_size] tensor}, in insertion order (the original)."""

    def __init__(self, embedding_size: int):
        if not isinstance(embedding_size, int) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        self.embedding_size = embedding_size
        self.skill_embeddings: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.skill_embeddings)

    def add_skill(self, skill_id: int, skill_embedding: torch.Tensor) -> None:
        """Store ``skill_embedding`` under ``skill_id`` (the original's argument order; an existing id is replaced).

        Calls in this package's former order ``add_skill(embedding, skill_id)`` still work with a DeprecationWarning.
        """
        if isinstance(skill_id, torch.Tensor) and not isinstance(skill_embedding, torch.Tensor):
            warnings.warn(
                "SkillLibrary.add_skill(embedding, skill_id) is deprecated: use the original's order "
                "add_skill(skill_id, embedding)",
                DeprecationWarning,
                stacklevel=2,
            )
            skill_id, skill_embedding = skill_embedding, skill_id
        if isinstance(skill_id, bool) or not isinstance(skill_id, int):
            raise TypeError(f"skill_id must be an int (the id of the expert made for the skill), got {skill_id!r}")
        embedding = skill_embedding.detach().float().reshape(-1).cpu()
        if embedding.numel() != self.embedding_size:
            raise ValueError(f"skill embedding has {embedding.numel()} values, expected {self.embedding_size}")
        self.skill_embeddings[int(skill_id)] = embedding

    def get_all_skills(self) -> torch.Tensor | None:
        """Every stored embedding stacked [N, embedding_size], or None for an empty library (the original)."""
        if not self.skill_embeddings:
            return None
        return torch.stack(list(self.skill_embeddings.values()))

    def similarities(self, embedding: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each embedding of ``embedding`` ([D] or [N, D]) to every stored skill: [N, skills]."""
        query = embedding.detach().float().cpu()
        query = query.reshape(1, -1) if query.dim() == 1 else query.reshape(-1, query.shape[-1])
        if query.shape[1] != self.embedding_size:
            raise ValueError(f"query embedding has {query.shape[1]} values, expected {self.embedding_size}")
        skills = self.get_all_skills()
        if skills is None:
            return query.new_empty(query.shape[0], 0)
        return F.cosine_similarity(query[:, None, :], skills[None, :, :], dim=-1, eps=1e-6)

    def closest(self, embedding: torch.Tensor) -> tuple[int | None, float]:
        """(skill id, similarity) of the stored skill most similar to one embedding; (None, -1.0) when empty."""
        sims = self.similarities(embedding.reshape(-1))[0]
        if sims.numel() == 0:
            return None, -1.0
        best = int(sims.argmax())
        return list(self.skill_embeddings)[best], float(sims[best])

    def save(self, path) -> None:
        """One safetensors file, a tensor ``skill_<id>`` per skill. (The original wrote a ``torch.save`` dict;
        :meth:`load` reads both.)"""
        tensors = {f"skill_{i}": e.contiguous() for i, e in self.skill_embeddings.items()}
        save_file(tensors, str(path), metadata={"embedding_size": str(self.embedding_size)})

    @classmethod
    def load(cls, path, embedding_size: int, device=None) -> SkillLibrary:
        """Read a library saved by :meth:`save` or by the original (``torch.save`` of {skill id: tensor}, read with
        ``weights_only=True``). Embeddings are kept on the CPU (``device`` is accepted for the original's signature;
        similarities are computed on the CPU)."""
        if is_safetensors_file(path):
            raw = load_file(str(path))
            bad = [k for k in raw if not (k.startswith("skill_") and k[6:].isdigit())]
            if bad:
                raise ValueError(f"{path}: unexpected tensors {bad}; expected skill_<id> entries")
            data = {int(k[6:]): v for k, v in raw.items()}
        else:
            data = load_torch_file(path)
            if not isinstance(data, dict):
                raise ValueError(f"{path} is not a skill library: it holds a {type(data).__name__}, expected a dict")
        library = cls(embedding_size)
        try:
            for skill_id, embedding in data.items():
                library.add_skill(int(skill_id), embedding)
        except (TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path} is not a skill library of {embedding_size}-value embeddings: {err}") from err
        return library


class NoveltyDetector:
    """Data is novel when its embedding is not close to the stored skills (the original's signature and default).

    ``is_novel(data_embedding)``: one embedding [D] is compared, as the original did, by its best cosine similarity
    to the library, or with ``use_median`` by the median of its similarities to all stored skills (``torch.median``:
    the lower of the two middle values for an even count), against ``similarity_threshold``. With a batch [N, D]
    (one embedding per sample), each sample's value is aggregated over the samples by the mean, or by the median
    when ``use_median``; the original left this aggregation unspecified. An empty library makes everything novel.
    """

    def __init__(self, skill_library: SkillLibrary, similarity_threshold: float = 0.75, use_median: bool = False, **kw):
        if "threshold" in kw:  # this package's former keyword
            warnings.warn("NoveltyDetector(threshold=) is deprecated: use similarity_threshold=", DeprecationWarning, 2)
            similarity_threshold = kw.pop("threshold")
        if kw:
            raise TypeError(f"NoveltyDetector got unexpected keyword arguments {sorted(kw)}")
        if not -1.0 <= similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold is a cosine similarity in [-1, 1], got {similarity_threshold}")
        self.skill_library = skill_library
        self.similarity_threshold = float(similarity_threshold)
        self.use_median = bool(use_median)

    def similarity(self, data_embedding: torch.Tensor) -> float:
        """The data's similarity to the library (see the class docstring); -1.0 for an empty library."""
        sims = self.skill_library.similarities(data_embedding)
        if sims.shape[1] == 0:
            return -1.0
        if self.use_median:
            return float(sims.median(dim=1).values.median())
        return float(sims.max(dim=1).values.mean())

    def is_novel(self, data_embedding: torch.Tensor) -> bool:
        return self.similarity(data_embedding) < self.similarity_threshold
