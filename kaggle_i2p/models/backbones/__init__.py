"""Vision backbones by library: one module per library (`timm_models`, `open_clip_models`), each a
`BackboneLibrary` registered in `kaggle_i2p.core.registry.LIBRARIES`; `library(name)` is the lookup."""

from ...core.registry import LIBRARIES, register_library
from .base import Backbone, BackboneLibrary, PosEmbedForSize, TextTowerError


def library(name: str) -> BackboneLibrary:
    """The registered library named `name` (KeyError naming the registered ones)."""
    return LIBRARIES.get(name)


def build_backbone(library_name: str, arch: str, native_resolution: int | None = None, classes: int = 0,
                   features: str | None = None, options: dict | None = None) -> Backbone:
    """The library's backbone with random weights."""
    return library(library_name).build_for(arch, native_resolution, classes, features, options)


def text_library(arch: str) -> BackboneLibrary:
    """The registered library whose model `arch` names with a text tower (an open_clip name or model config, a
    transformers CLIP or SigLIP folder), each library with a text side asked in turn; TextTowerError naming them."""
    for candidate in LIBRARIES:
        if candidate.text_side and candidate.reads_text_arch(str(arch)):
            return candidate
    names = ", ".join(lib.name for lib in LIBRARIES if lib.text_side)
    raise TextTowerError(f"{arch!r} names no model with a text tower that a registered library reads ({names}): "
                         "give an open_clip model name or model-config .json, or a transformers CLIP/SigLIP "
                         "save_pretrained folder (its config.json and tokenizer)")


__all__ = ["Backbone", "BackboneLibrary", "PosEmbedForSize", "TextTowerError", "build_backbone", "library",
           "register_library", "text_library"]
