"""The prior kind: a constant tower, the same unit vector (e.g. the mean prompt embedding) for every image; no views,
no network."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..core.registry import register_kind
from ..manifest.fields import entry_field, entry_keys
from ..manifest.parse import ParseContext, parse_dim_weights, parse_vector, parse_weight
from ..manifest.schema import KindExample, TowerKind, TowerSpec


@dataclass(frozen=True, kw_only=True)
class PriorSpec(TowerSpec):
    """A constant tower: the same unit vector (e.g. the mean prompt embedding) for every image; no views, no network."""

    kind: ClassVar[str] = "prior"
    vector: np.ndarray = entry_field(written=False, repr=False, compare=False)
    vector_path: Path = entry_field(key="vector", path=True)

    def constant(self) -> np.ndarray:
        return self.vector

    def describe(self) -> str:
        return f"prior (a constant vector), weight {self.weight:g}"


class PriorKind(TowerKind):
    """A vector read once from a .npy; the ensemble gives it to every image."""

    name = "prior"
    spec = PriorSpec

    def parse(self, raw: Mapping, name: str, label: str, ctx: ParseContext) -> PriorSpec | None:
        """A constant tower: the same unit vector (e.g. the mean prompt embedding) for every image."""
        problems, before = ctx.problems, ctx.problems.mark()
        problems.unknown_keys(raw, entry_keys(PriorSpec), label, what="key for a prior tower")
        for key in ("vector", "weight"):
            if key not in raw:
                problems.add(f"{label}.{key}", "is required")
        path, vector = parse_vector(raw["vector"], ctx.base_dir, f"{label}.vector", problems, ctx.embedding_dim,
                                    "prior vector (.npy)") if "vector" in raw else (None, None)
        weight = parse_weight(raw, label, problems)
        dim_weights, dim_weights_path = parse_dim_weights(raw, label, ctx)
        if problems.blocking_since(before):
            return None
        return PriorSpec(name=name, weight=weight, dim_weights=dim_weights, dim_weights_path=dim_weights_path,
                         vector=vector, vector_path=path)

    def example(self, folder: Path, out_dim: int, embedding_dim: int) -> KindExample:
        """A random unit vector of the embedding's width: a tower with no network."""
        vector = np.random.default_rng(5).standard_normal(embedding_dim).astype(np.float32)
        np.save(Path(folder) / "prior_vector.npy", vector / np.linalg.norm(vector))
        return KindExample({"kind": "prior", "vector": "prior_vector.npy"}, network=False)


PRIOR = register_kind(PriorKind())
