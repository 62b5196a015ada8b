"""timm as a model library: any `timm.list_models()` name, built offline, ViTs resampling their position
embeddings at every forward (`dynamic_img_size`) and, for a new native size, by timm's `resample_abs_pos_embed`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ...core.registry import register_library
from .base import Backbone, BackboneLibrary


def _patch_embed(backbone: nn.Module) -> nn.Module | None:
    return getattr(backbone, "patch_embed", None)


class TimmLibrary(BackboneLibrary):
    """timm models (ViT, EVA, ConvNeXt, EfficientNet, ...)."""

    name = "timm"
    arch_example = "eva02_large_patch14_clip_336"
    embedding_names = ("patch_embed", "pos_embed", "cls_token", "reg_token", "stem", "conv1", "rope")
    no_weight_decay_names = ("pos_embed", "cls_token")
    classifier_prefixes = ("head.", "fc.", "classifier.", "head_dist.")

    def build(self, arch: str, native_resolution: int | None, classes: int) -> Backbone:
        """A timm model with `classes` outputs (0: its pooled features); ViTs resample position embeddings per
        input."""
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

    def patch_size(self, backbone: nn.Module) -> int | None:
        size = getattr(_patch_embed(backbone), "patch_size", None)
        return None if size is None else int(size[0] if isinstance(size, (tuple, list)) else size)

    def position_grid(self, backbone: nn.Module) -> tuple[int, int] | None:
        if "pos_embed" not in dict(backbone.named_parameters()):
            return None
        grid = getattr(_patch_embed(backbone), "grid_size", None)
        return None if grid is None else (int(grid[0]), int(grid[1]))

    def resample_position_embeddings(self, state: Mapping[str, torch.Tensor], backbone: nn.Module
                                     ) -> dict[str, torch.Tensor]:
        """timm ViT / EVA `pos_embed` (1, prefix + gh * gw, C) resampled by timm's `resample_abs_pos_embed`."""
        out = dict(state)
        expected = backbone.state_dict().get("pos_embed")
        value = state.get("pos_embed")
        if value is None or expected is None or tuple(expected.shape) == tuple(value.shape):
            return out
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 1))
        out["pos_embed"] = resample_abs_pos_embed(value.float(), new_size=list(backbone.patch_embed.grid_size),
                                                  num_prefix_tokens=prefix).to(value.dtype)
        return out


TIMM = register_library(TimmLibrary())
