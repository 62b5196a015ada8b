"""Vision backbones by library, built offline: a table of builders (timm, open_clip), and position-embedding
resampling by the libraries' own functions.

Every builder takes the architecture name, the native input size (None: the arch's own) and the number of classifier
outputs (0: pooled features), and returns a `Backbone`. Nothing touches the network: timm `pretrained=False`,
open_clip's vision-tower builder with no pretrained tag.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

PosEmbedForSize = Callable[[nn.Module, int, int], dict[str, torch.Tensor]]


class Backbone(NamedTuple):
    """A built backbone: the module, the width of what it outputs, and for fixed-grid ViTs (open_clip) the function
    that resamples its position embeddings for another input size, with the size they are laid out for."""

    module: nn.Module
    out_dim: int
    pos_embed_for_size: PosEmbedForSize | None = None
    native_size: int | None = None


def build_timm(arch: str, native_resolution: int | None, classes: int) -> Backbone:
    """A timm model with `classes` outputs (0: its pooled features); ViTs resample position embeddings per input."""
    import timm

    if not timm.is_model(arch):
        raise ValueError(f"timm has no model named {arch!r} (timm {timm.__version__}); "
                         "check the spelling with timm.list_models('*pattern*')")
    kwargs: dict = {"pretrained": False, "num_classes": classes}
    if native_resolution is not None:
        kwargs["img_size"] = native_resolution
    try:  # ViT-style models resample their position embeddings to the input size at every forward
        model = timm.create_model(arch, dynamic_img_size=True, **kwargs)
    except TypeError as err:
        if "dynamic_img_size" not in str(err):
            raise
        model = timm.create_model(arch, **kwargs)  # convolutional: any input size works as it is
    return Backbone(model, int(model.num_classes if classes else model.num_features))


def open_clip_config(arch: str) -> dict:
    """An open_clip model config: by registered name, or read from a model-config .json file."""
    import open_clip

    if arch.endswith(".json"):
        return json.loads(Path(arch).read_text(encoding="utf-8"))
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"open_clip has no model config named {arch!r} (open_clip {open_clip.__version__}); "
                         "see open_clip.list_models(), or give the path of a model-config .json")
    return config


def build_open_clip(arch: str, native_resolution: int | None, classes: int) -> Backbone:
    """An open_clip image tower (its embedding); ViTs get a position-embedding resampler for other input sizes."""
    from open_clip.model import _build_vision_tower
    from open_clip.transformer import VisionTransformer

    if classes:
        raise ValueError("an open_clip image tower gives embeddings, not class logits: use score: embedding with a "
                         "bank whose keys are the matching CLIP text embeddings")
    config = open_clip_config(arch)
    vision_cfg = dict(config["vision_cfg"])
    if native_resolution is not None:
        vision_cfg["image_size"] = native_resolution
    visual = _build_vision_tower(config["embed_dim"], vision_cfg, quick_gelu=config.get("quick_gelu", False))
    if not isinstance(visual, VisionTransformer):  # timm-trunk (ConvNeXt) towers run at any size as they are
        return Backbone(visual, int(config["embed_dim"]))
    size = vision_cfg.get("image_size", 224)
    return Backbone(visual, int(config["embed_dim"]), _resize_open_clip_pos_embed,
                    size if isinstance(size, int) else size[0])


BUILDERS: dict[str, Callable[[str, int | None, int], Backbone]] = {"timm": build_timm, "open_clip": build_open_clip}


def build_backbone(library: str, arch: str, native_resolution: int | None = None, classes: int = 0) -> Backbone:
    """The `library`'s builder from `BUILDERS`, with random weights."""
    return BUILDERS[library](arch, native_resolution, classes)


def _open_clip_pos_embed_to_grid(positional_embedding: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """open_clip's own `resize_pos_embed` (class token kept, the patch grid resampled)."""
    from open_clip.model import resize_pos_embed

    target = nn.Module()
    target.visual = nn.Module()
    target.visual.grid_size = tuple(grid)
    state = {"visual.positional_embedding": positional_embedding}
    resize_pos_embed(state, target)
    return state["visual.positional_embedding"]


def _resize_open_clip_pos_embed(visual: nn.Module, height: int, width: int) -> dict[str, torch.Tensor]:
    """A copy of the visual tower's position embedding resampled for a height x width input."""
    patch_h, patch_w = visual.patch_size if isinstance(visual.patch_size, tuple) else (visual.patch_size,) * 2
    grid = (height // patch_h, width // patch_w)
    stored = visual.positional_embedding  # resampled in fp32 (fp16 weights too: bicubic wants the precision)
    return {"positional_embedding": _open_clip_pos_embed_to_grid(stored.float(), grid).to(stored.dtype)}


def resample_position_embeddings(state: Mapping[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """`state` (backbone keys) with absolute position embeddings resampled to `backbone`'s patch grid, by the
    libraries' own functions (timm `resample_abs_pos_embed`, open_clip `resize_pos_embed`); other tensors as given."""
    expected = backbone.state_dict()
    out = dict(state)
    for key, value in state.items():
        if key not in expected or tuple(expected[key].shape) == tuple(value.shape):
            continue
        if key == "pos_embed":  # timm ViT / EVA: (1, prefix + gh * gw, C)
            from timm.layers import resample_abs_pos_embed

            prefix = 0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 1))
            out[key] = resample_abs_pos_embed(value.float(), new_size=list(backbone.patch_embed.grid_size),
                                              num_prefix_tokens=prefix).to(value.dtype)
        elif key == "positional_embedding" and hasattr(backbone, "grid_size"):  # open_clip ViT: (1 + gh * gw, C)
            out[key] = _open_clip_pos_embed_to_grid(value, backbone.grid_size)
    return out


def patch_size(backbone: nn.Module) -> int | None:
    """The patch size of a ViT-style backbone (input sizes must be multiples of it), else None."""
    for candidate in (getattr(getattr(backbone, "patch_embed", None), "patch_size", None),
                      getattr(backbone, "patch_size", None)):
        if candidate is not None:
            return int(candidate[0] if isinstance(candidate, (tuple, list)) else candidate)
    return None


def native_size(backbone: nn.Module) -> int | None:
    """The input size the backbone's position embeddings are laid out for (ViTs), else None."""
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None) or getattr(backbone, "grid_size", None)
    size = patch_size(backbone)
    return None if grid is None or size is None else int(grid[0]) * size


def has_position_grid(backbone: nn.Module) -> bool:
    """Whether absolute position embeddings tie the backbone to one input grid (ViT/EVA), unlike a convnet."""
    names = dict(backbone.named_parameters())
    return "pos_embed" in names or "positional_embedding" in names
