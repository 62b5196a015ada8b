"""timm as a model library: any `timm.list_models()` name, built offline, ViTs resampling their position
embeddings at every forward (`dynamic_img_size`) and, for a new native size, by timm's `resample_abs_pos_embed`."""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ...core.errors import EntryFieldError
from ...core.registry import register_library
from .base import Backbone, BackboneLibrary


def _patch_embed(backbone: nn.Module) -> nn.Module | None:
    return getattr(backbone, "patch_embed", None)


def _positive_int(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EntryFieldError(f"{value!r} must be a positive integer", field)
    return value


def _model_kwargs(options: Mapping) -> dict:
    extra = options.get("model_kwargs") or {}
    if not isinstance(extra, Mapping):
        raise EntryFieldError(f"{extra!r} must map timm.create_model keywords to values", "backbone.model_kwargs")
    reserved = sorted({"pretrained", "num_classes", "global_pool", "img_size"} & set(extra))
    if reserved:
        raise EntryFieldError(f"{', '.join(reserved)} are set by the entry's own fields, not here",
                              "backbone.model_kwargs")
    return dict(extra)


FINAL_NORMS = ("norm.", "fc_norm.", "head.norm.")  # the norms after the last block, by timm's names


def _drop_final_norm(model: nn.Module) -> None:
    """No norm after the last block (`norm`, `fc_norm`, a ConvNeXt head's `norm`), as a model trained without one."""
    for owner, name in ((model, "norm"), (model, "fc_norm"), (getattr(model, "head", None), "norm")):
        if isinstance(getattr(owner, name, None), nn.Module):
            setattr(owner, name, nn.Identity())


def _cls_mean_head(self: nn.Module, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """The class token beside the mean of the patch tokens (register tokens left out): twice the width."""
    return torch.cat([x[:, 0], x[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)


def _create(arch: str, kwargs: dict) -> nn.Module:
    """timm.create_model offline; ViT-style models resample their position embeddings at every forward."""
    import timm

    try:
        return timm.create_model(arch, dynamic_img_size=True, **kwargs)
    except TypeError as err:
        if "dynamic_img_size" not in str(err):
            raise
        return timm.create_model(arch, **kwargs)  # convolutional: any input size works as it is


class TimmLibrary(BackboneLibrary):
    """timm models (ViT, EVA, ConvNeXt, EfficientNet, ...)."""

    name = "timm"
    arch_example = "eva02_large_patch14_clip_336"
    embedding_names = ("patch_embed", "pos_embed", "cls_token", "reg_token", "stem", "conv1", "rope")
    no_weight_decay_names = ("pos_embed", "cls_token")
    classifier_prefixes = ("head.", "fc.", "classifier.", "head_dist.")

    feature_choices = ("pooled", "logits")  # logits: its classifier's outputs feed the head (the 111th place)
    option_keys = {
        "global_pool": "timm's pooling (avg, token, avgmax, max, map, ...) or cls_mean: the class token "
                       "concatenated with the mean of the patch tokens (the 5th place's EVA02)",
        "final_norm": "false: no norm after the last block, as trained",
        "num_classes": "the classifier's outputs for features: logits (the arch's default when left out)",
        "model_kwargs": "any other timm.create_model keyword the training code passed, e.g. {class_token: false}",
    }

    def build(self, arch: str, native_resolution: int | None, classes: int, features: str | None = None,
              options: Mapping | None = None) -> Backbone:
        """A timm model with `classes` outputs (0: its pooled features, or its classifier's for `features: logits`);
        ViTs resample position embeddings per input; `options` as the entry's `backbone:` section says."""
        import timm

        if not timm.is_model(arch):
            raise ValueError(f"timm has no model named {arch!r} (timm {timm.__version__}); "
                             "check the spelling with timm.list_models('*pattern*')")
        options = dict(options or {})
        kwargs: dict = {"pretrained": False, "num_classes": classes, **_model_kwargs(options)}
        logits = features == "logits"
        if logits:
            if classes:
                raise EntryFieldError("features: logits feeds a head; this tower's kind wants the classes itself",
                                      "features")
            kwargs.pop("num_classes")
            if options.get("num_classes") is not None:
                kwargs["num_classes"] = _positive_int(options["num_classes"], "backbone.num_classes")
        pool = options.get("global_pool")
        if pool is not None:
            kwargs["global_pool"] = "token" if pool == "cls_mean" else pool
        if native_resolution is not None:
            kwargs["img_size"] = native_resolution
        try:
            model = _create(arch, kwargs)
        except Exception as err:
            if pool == "cls_mean":  # built with token pooling, which only models with a class token have
                raise EntryFieldError(f"cls_mean pools a ViT's class and patch tokens; {arch} has no tokens "
                                      f"({err})", "backbone.global_pool") from err
            raise
        if options.get("final_norm") is False:
            _drop_final_norm(model)
        width = int(model.num_classes if classes or logits else model.num_features)
        if pool == "cls_mean":
            if logits or not hasattr(model, "num_prefix_tokens"):
                raise EntryFieldError(f"cls_mean pools a ViT's tokens into the head's input; {arch} "
                                      f"{'feeds a classifier' if logits else 'has no tokens'}", "backbone.global_pool")
            model.forward_head = types.MethodType(_cls_mean_head, model)
            width *= 2
        return Backbone(model, width)

    def option_problems(self, features: str | None, options: Mapping | None) -> list[tuple[str, str]]:
        """The base checks, and each option's type: global_pool a name, final_norm true or false."""
        problems = super().option_problems(features, options)
        options = options or {}
        if "global_pool" in options and not (isinstance(options["global_pool"], str) and options["global_pool"]):
            problems.append(("backbone.global_pool", f"{options['global_pool']!r} must be a pooling name such as "
                                                     "avg, token or cls_mean"))
        if "final_norm" in options and not isinstance(options["final_norm"], bool):
            problems.append(("backbone.final_norm", f"{options['final_norm']!r} must be true or false"))
        if "num_classes" in options and features != "logits":
            problems.append(("backbone.num_classes", "only with features: logits (the classifier feeds the head)"))
        return problems

    def checkpoint_layouts(self, state: dict[str, torch.Tensor], backbone_keys: set[str]
                           ) -> Iterator[tuple[dict[str, torch.Tensor], str]]:
        """A file that holds a final norm this tower does not apply (`final_norm: false`, or an EVA trained from
        `forward_features` with its `fc_norm` unused): the backbone's keys, the unused norm's left out."""
        unused = [k for k in state if k.startswith(FINAL_NORMS) and k not in backbone_keys]
        if unused:
            yield ({k: v for k, v in state.items() if k in backbone_keys},
                   f"{len(unused)} weights of a final norm the tower does not apply left out "
                   f"({', '.join(sorted({k.rsplit('.', 1)[0] for k in unused}))})")

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
