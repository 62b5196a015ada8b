"""The weights manifest: which towers to run, how to preprocess for each, and how to weight them.

The manifest is data, and this package owns it in both directions: `parse` reads and validates a file completely
before any model code runs, reporting every problem at once (`load_manifest`); `write` writes one, validated first,
then atomically, every path rebased to the folder it is written to (`write_manifest`, `save_manifest`). `schema`
holds the spec classes every kind builds on and `fields` the marks that the keys, the writer, path rebasing and the
cache's identity are derived from. Each kind's own spec lives in its module under `kaggle_i2p.kinds`.
"""

from __future__ import annotations

from typing import Any

from .fields import checked_fields, entry_dict, entry_field, entry_keys, identity_dict, path_text
from .parse import (
    IMAGE_KEYS,
    NAMED_MANIFESTS,
    ParseContext,
    as_manifest,
    load_fallback,
    load_manifest,
    parse_dim_weights,
    parse_entry,
    parse_image,
    parse_manifest,
    parse_network,
    parse_tower,
    parse_weight,
    register_named_manifest,
    resolve_manifest,
)
from .schema import (
    CHECKPOINT_SUFFIXES,
    DEFAULT_EMBEDDING_DIM,
    DEFAULT_KIND,
    INTERPOLATIONS,
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    PRECISIONS,
    RESIZE_MODES,
    TOP_KEYS,
    TRAIN_PRECISIONS,
    EncodingContext,
    ImageSpec,
    KeyRules,
    KindExample,
    Manifest,
    ManifestError,
    NetworkSpec,
    OutputSpec,
    Precision,
    TowerKind,
    TowerSpec,
    TrainPrecision,
    View,
    ViewOutput,
    kind_of,
    tower_label,
)
from .write import edit_manifest, init_manifest, rebase_manifest_paths, save_manifest, write_manifest


def __getattr__(name: str) -> Any:
    """The registered library and kind names, looked up when asked for."""
    if name in ("LIBRARIES", "KINDS"):
        from ..core import registry

        return getattr(registry, name).names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CHECKPOINT_SUFFIXES", "DEFAULT_EMBEDDING_DIM", "DEFAULT_KIND", "IMAGE_KEYS", "INTERPOLATIONS", "MAX_RESOLUTION",
    "MIN_RESOLUTION", "NAMED_MANIFESTS", "PRECISIONS", "RESIZE_MODES", "TOP_KEYS", "TRAIN_PRECISIONS", "ImageSpec",
    "KeyRules", "Manifest", "ManifestError", "NetworkSpec", "ParseContext", "Precision", "TowerKind", "TowerSpec",
    "TrainPrecision", "View", "EncodingContext", "KindExample", "OutputSpec", "ViewOutput",
    "as_manifest", "checked_fields", "edit_manifest", "entry_dict", "entry_field", "entry_keys", "identity_dict",
    "init_manifest", "kind_of", "load_fallback",
    "load_manifest", "parse_dim_weights", "parse_entry", "parse_image", "parse_manifest", "parse_network",
    "parse_tower", "parse_weight", "path_text", "rebase_manifest_paths", "register_named_manifest", "resolve_manifest",
    "save_manifest", "tower_label", "write_manifest",
]
