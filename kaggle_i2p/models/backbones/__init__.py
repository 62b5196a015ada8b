"""Vision backbones by library: one module per library (`timm_models`, `open_clip_models`), each a
`BackboneLibrary` registered in `kaggle_i2p.core.registry.LIBRARIES`; `library(name)` is the lookup."""

from ...core.registry import LIBRARIES, register_library
from .base import Backbone, BackboneLibrary, PosEmbedForSize


def library(name: str) -> BackboneLibrary:
    """The registered library named `name` (KeyError naming the registered ones)."""
    return LIBRARIES.get(name)


def build_backbone(library_name: str, arch: str, native_resolution: int | None = None, classes: int = 0,
                   features: str | None = None, options: dict | None = None) -> Backbone:
    """The library's backbone with random weights."""
    return library(library_name).build_for(arch, native_resolution, classes, features, options)


__all__ = ["Backbone", "BackboneLibrary", "PosEmbedForSize", "build_backbone", "library", "register_library"]
