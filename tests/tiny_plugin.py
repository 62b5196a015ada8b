"""A plugin from outside the package, as a user would write one: a tiny model library and a tiny tower kind.

- library `meanrgb`: the backbone averages each channel of the (normalised) image, so its 3 features are known
  without running it; `arch` is the number of features kept, "rgb".
- kind `anchored`: a linear head, then a step after encoding that pulls every unit output towards an anchor vector
  (`anchor`, a .npy path, and `mix`, its weight): embedding = normalise(output + mix * anchor).

Importing the module registers both (the entry-point way); `register()` does it again after a test removed them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from kaggle_i2p import register_kind, register_library
from kaggle_i2p.core.validate import is_number, resolve_file
from kaggle_i2p.manifest import (
    NetworkSpec,
    ParseContext,
    TowerKind,
    entry_field,
    entry_keys,
    load_fallback,
    parse_network,
)
from kaggle_i2p.models.backbones import Backbone, BackboneLibrary


class ChannelMean(nn.Module):
    """(B, 3, H, W) -> (B, 3): each channel's mean; a scale parameter so the checkpoint holds something."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3)) * self.scale


class MeanRGB(BackboneLibrary):
    name = "meanrgb"
    arch_example = "rgb"

    def build(self, arch: str, native_resolution: int | None, classes: int) -> Backbone:
        if arch != "rgb":
            raise ValueError(f"meanrgb has no model named {arch!r}; it has: rgb")
        return Backbone(ChannelMean(), 3)


@dataclass(frozen=True, kw_only=True)
class AnchoredSpec(NetworkSpec):
    kind: ClassVar[str] = "anchored"
    anchor_path: Path = entry_field(key="anchor", path=True, identity=False)  # used after encoding only
    anchor: np.ndarray = entry_field(written=False, repr=False, compare=False)
    mix: float = entry_field(identity=False)

    @property
    def head_name(self) -> str:
        return "linear head, anchored"


class Anchored(TowerKind):
    name = "anchored"
    spec = AnchoredSpec

    def parse(self, raw: Mapping, name: str, label: str, ctx: ParseContext) -> AnchoredSpec | None:
        return parse_network(raw, name, label, ctx, self, self._section)

    @staticmethod
    def _section(raw: Mapping, label: str, ctx: ParseContext) -> dict:
        path = resolve_file(raw.get("anchor"), ctx.base_dir, f"{label}.anchor", ctx.problems, "anchor vector")
        anchor = load_fallback(path, ctx.embedding_dim) if path is not None else None
        mix = raw.get("mix", 0.0)
        if not is_number(mix):
            ctx.problems.add(f"{label}.mix", f"{mix!r} must be a number")
        return {"anchor_path": path, "anchor": anchor, "mix": float(mix) if is_number(mix) else 0.0}

    def build_head(self, spec: AnchoredSpec, in_dim: int, embedding_dim: int) -> nn.Module:
        return nn.Linear(in_dim, embedding_dim)

    def has_step_after_encoding(self, spec: AnchoredSpec) -> bool:
        return True

    def after_encoding(self, spec: AnchoredSpec, outputs: np.ndarray, context) -> np.ndarray:
        pulled = outputs.astype(np.float64) + spec.mix * spec.anchor
        return (pulled / np.linalg.norm(pulled, axis=1, keepdims=True)).astype(np.float32)


LIBRARY, KIND = MeanRGB(), Anchored()
KEYS = entry_keys(AnchoredSpec)


def register() -> None:
    """Register both (again); a name already holding these very objects is left as it is."""
    register_library(LIBRARY, replace=True)
    register_kind(KIND, replace=True)


register()
