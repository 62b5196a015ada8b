"""The features kind: an image model's pooled features and no head, run and cached as any tower, for a fusion tower
to read (a ConvNeXt's pooler beside a CLIP embedding, as one public solution fused them). Its output is not an
embedding: its weight is 0, and only a fusion tower uses it.

    - name: convnext_pool
      kind: features
      library: timm
      arch: convnext_xxlarge
      checkpoint: convnext.safetensors
      checkpoint_keys: {ignore: [head.]}     # when the file holds a head too
      image: {...}
      weight: 0
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

from torch import nn

from ..core.registry import register_kind
from ..manifest.parse import ParseContext, parse_network
from ..manifest.schema import KindExample, NetworkSpec, OutputSpec, TowerKind


@dataclass(frozen=True, kw_only=True)
class FeaturesSpec(NetworkSpec):
    """An image model's pooled features, with no head: a fusion tower's input."""

    kind: ClassVar[str] = "features"

    @property
    def head_name(self) -> str:
        return "no head (its features feed a fusion tower)"


@lru_cache(maxsize=64)
def _width(library: str, arch: str, native: int | None, features: str | None, options: str) -> int:
    import torch

    from ..models.backbones import library as library_named

    with torch.device("meta"):
        return library_named(library).build_for(arch, native, 0, features, json.loads(options) or None).out_dim


class FeaturesKind(TowerKind):
    """A backbone's pooled features, unchanged: no head."""

    name = "features"
    spec = FeaturesSpec
    reported_keys = frozenset({"head"})

    def parse(self, raw: Mapping, name: str, label: str, ctx: ParseContext) -> FeaturesSpec | None:
        return parse_network(raw, name, label, ctx, self, self._parse_section)

    def example(self, folder: Path, out_dim: int, embedding_dim: int) -> KindExample:
        """A backbone's features at weight 0, and the fusion tower that reads them (what a features tower is for)."""
        from .fusion import example_entry

        reader = example_entry(folder, "fuse", [{"tower": "tiny", "output": "features"}], out_dim, embedding_dim)
        return KindExample({"kind": "features", "weight": 0}, companions=(reader,))

    def output(self, spec: FeaturesSpec, embedding_dim: int) -> OutputSpec:
        """The backbone's feature width, read from the model built on the meta device (once per architecture)."""
        return OutputSpec(_width(spec.library, spec.arch, spec.native_resolution, spec.features,
                                 json.dumps(spec.backbone or {}, sort_keys=True)))

    @staticmethod
    def _parse_section(raw: Mapping, label: str, ctx: ParseContext) -> dict:
        if "head" in raw:
            ctx.problems.add(f"{label}.head", "a features tower has no head: a fusion tower's head reads its "
                                              "features")
        weight = raw.get("weight")
        if weight not in (None, 0, 0.0) and not isinstance(weight, bool):
            ctx.problems.add(f"{label}.weight", f"{weight!r}: a features tower's output is not an embedding, so "
                                                "the ensemble cannot weight it; give weight 0 and read it in a "
                                                "fusion tower's inputs")
        return {}

    def build_head(self, spec: FeaturesSpec, in_dim: int, embedding_dim: int) -> nn.Module:
        return nn.Identity()

    def gives_embeddings(self, spec: FeaturesSpec) -> bool:
        return False


FEATURES = register_kind(FeaturesKind())
