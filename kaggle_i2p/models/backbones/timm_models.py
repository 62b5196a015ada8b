"""timm as a model library: any `timm.list_models()` name, built offline, ViTs resampling their position
embeddings at every forward (`dynamic_img_size`) and, for a new native size, by timm's `resample_abs_pos_embed`."""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.errors import EntryFieldError
from ...core.registry import register_library
from .base import (
    CONVNEXT_BLOCKS,
    TRANSFORMER_BLOCKS,
    Backbone,
    BackboneLibrary,
    Candidate,
    Shapes,
    key_prefix,
    under_prefix,
)


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
    block_patterns = CONVNEXT_BLOCKS + TRANSFORMER_BLOCKS  # for layer-wise LR decay
    embedding_names = ("patch_embed", "pos_embed", "cls_token", "reg_token", "stem", "conv1", "rope")
    no_weight_decay_names = ("pos_embed", "cls_token")
    classifier_prefixes = ("head.fc.", "head.", "fc.", "classifier.", "head_dist.")  # ConvNeXt's first

    feature_choices = ("pooled", "logits")  # logits: its classifier's outputs feed the head (the 111th place)

    def saved_preprocessing(self, saved: Any, name: str) -> tuple[dict, dict]:
        """timm's train.py keeps its run's arguments in every checkpoint: the eval transform's mean, std,
        interpolation and crop where the run set them (None: the model's pretrained_cfg, read already), and the
        size (`img_size`, `input_size`)."""
        args = _train_args(saved)
        if not args:
            return {}, {}
        source = f"{name}'s args (timm's train.py)"
        given = {k: args.get(k) for k in ("mean", "std", "interpolation", "crop_pct", "crop_mode")
                 if args.get(k) not in (None, "")}
        image, sources = eval_transform(given, source)
        image = {k: v for k, v in image.items() if k in sources}
        size = args.get("img_size") or (args.get("input_size") or [None])[-1]
        if isinstance(size, int):
            image["resolutions"], sources["resolutions"] = [size], source
        return image, sources
    option_keys = {
        "global_pool": "timm's pooling (avg, token, avgmax, max, map, ...) or cls_mean: the class token "
                       "concatenated with the mean of the patch tokens (the 5th place's EVA02)",
        "final_norm": "false: no norm after the last block, as trained",
        "num_classes": "the classifier's outputs for features: logits (the arch's default when left out)",
        "model_kwargs": "any other timm.create_model keyword the training code passed, e.g. {class_token: false}",
    }

    def example(self, folder: Path, features: str | None = None) -> str | None:
        """timm's own test ViT (`test_vit`), built by name: nothing to write."""
        return "test_vit" if features is None else None

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


    # --- inspect
    def propose(self, shapes: Shapes, head_in: int | None, source: Path, arch: str | None = None
                ) -> Iterator[Candidate]:
        """A ViT / EVA / DeiT, ConvNeXt or Swin found by its stem's keys; the timm names of its width built on the
        meta device and kept when their keys and shapes are the file's (a depth the file has, as model_kwargs);
        then its pooling, final norm and logits as the head's width and the file's keys say."""
        found = _signature(shapes)
        if found is None:
            if arch is not None:  # any other timm model (a ResNet, an EfficientNet) when --arch names it
                yield from _named(shapes, head_in, arch)
            return
        family, prefix, width, depth = found
        backbone = under_prefix(shapes, prefix)
        names = [arch] if arch else _names(family, width, backbone)
        signature = tuple(sorted(backbone.items()))  # the same backbone for each head inspect tries: built once
        built = [m for m in (_match(n, family, signature, depth) for n in names) if m is not None]
        matches = sorted((m for m in built if not m[4]), key=lambda m: (bool(m[1]), m[3] is not None, len(m[0]), m[0]))
        same = [m[0] for m in matches[1:] if m[1] == matches[0][1]] if matches else []
        if not matches and built:  # the closest name, so the deep check names the keys that differ
            closest = min(built, key=lambda m: (len(m[4]), len(m[0])))
            if len(closest[4]) <= max(3, len(backbone) // 10):
                matches = [closest]
                same = [f"the file lacks or reshapes {len(closest[4])} of {closest[0]}'s keys: "
                        f"{', '.join(closest[4][:4])}"]
        for name, kwargs, model, native, _ in matches[:3]:
            yield from _readings(name, kwargs, model, native, family, backbone, prefix, head_in, same)


def _signature(shapes: Shapes) -> tuple[str, str, int, object] | None:
    """(family, key prefix, width, depth) of a timm backbone among the file's keys, or None."""
    prefix = key_prefix(shapes, "stem.0.weight")
    if prefix is not None and any(k.startswith(f"{prefix}stages.0.") for k in shapes):
        return "ConvNeXt", prefix, shapes[f"{prefix}stem.0.weight"][0], _stage_depths(shapes, prefix, "stages")
    prefix = key_prefix(shapes, "patch_embed.proj.weight")
    if prefix is None or len(shapes[f"{prefix}patch_embed.proj.weight"]) != 4:
        return None
    width = shapes[f"{prefix}patch_embed.proj.weight"][0]
    if any(k.startswith(f"{prefix}layers.0.blocks.") for k in shapes):
        return "Swin", prefix, width, _stage_depths(shapes, prefix, "layers")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(rf"{re.escape(prefix)}blocks\.(\d+)\.", k))}
    if not blocks:
        return None
    return "ViT", prefix, width, max(blocks) + 1  # EVA, DeiT, ... too: the names built tell them apart


def _stage_depths(shapes: Shapes, prefix: str, stages: str) -> tuple[int, ...]:
    found: dict[int, set[int]] = {}
    for key in shapes:
        if m := re.match(rf"{re.escape(prefix)}{stages}\.(\d+)\.blocks\.(\d+)\.", key):
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return tuple(max(found[s]) + 1 for s in sorted(found))


VIT_WIDTHS = {192: "tiny", 384: "small", 512: "medium", 768: "base", 1024: "large", 1152: "so400m", 1280: "huge",
              1408: "giant", 1664: "gigantic"}
CONVNEXT_WIDTHS = {40: ("atto",), 48: ("femto",), 64: ("pico",), 80: ("nano",), 96: ("tiny", "small"),
                   128: ("base",), 192: ("large",), 256: ("xlarge",), 384: ("xxlarge",)}
SWIN_WIDTHS = {96: ("tiny", "small"), 128: ("base",), 192: ("large",)}
MAX_NAMES = 40  # timm names built per inspection (on the meta device: no memory, no compute)


def _names(family: str, width: int, backbone: Shapes) -> list[str]:
    """The timm names of this family and width (by timm's size words), and its tiny test models."""
    import timm

    if family == "ViT":
        patch = backbone["patch_embed.proj.weight"][-1]
        word = VIT_WIDTHS.get(width)
        names = timm.list_models(f"*_{word}_patch{patch}_*") + timm.list_models(f"*_{word}_patch{patch}") \
            if word else []
    elif family == "ConvNeXt":
        names = [n for w in CONVNEXT_WIDTHS.get(width, ()) for n in timm.list_models(f"convnext*_{w}*")]
    else:
        names = [n for w in SWIN_WIDTHS.get(width, ()) for n in timm.list_models(f"swin*_{w}_*")]
    return list(dict.fromkeys(names))[:MAX_NAMES] + timm.list_models("test_*")


@functools.lru_cache(maxsize=64)
def _match(name: str, family: str, signature: tuple, depth: object
           ) -> tuple[str, dict, nn.Module, int | None, list[str]] | None:
    """(name, model_kwargs, the model on meta, the file's native size if not the name's, which of its keys the
    file lacks or shapes otherwise: none when it is this timm model, final norms and position-embedding length aside);
    None when it does not build or its position embeddings are not the file's width. `signature`: the file's
    backbone keys and shapes as sorted pairs (hashable: memoised across the heads inspect tries)."""
    backbone = dict(signature)
    kwargs: dict = {}
    for _ in range(2):
        try:
            with torch.device("meta"):
                model = _create(name, {"pretrained": False, "num_classes": 0, **kwargs})
        except Exception:  # noqa: BLE001 - a name that does not build so is not this file's
            return None
        keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = _depth(keys, family)
        if got == depth or kwargs:
            break
        kwargs = {"depth": depth} if family == "ViT" else {"depths": list(depth)}
    checked = {k: v for k, v in keys.items() if not k.startswith(FINAL_NORMS) and k != "pos_embed"}
    differ = sorted(k for k, v in checked.items() if backbone.get(k) != v)
    if "pos_embed" in keys:
        stored = backbone.get("pos_embed")
        if stored is None or stored[-1] != keys["pos_embed"][-1]:
            return None
        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
        grid = int(round((stored[1] - prefix) ** 0.5))
        native = grid * int(model.patch_embed.patch_size[0])
        return name, kwargs, model, None if native == int(model.patch_embed.img_size[0]) else native, differ
    return name, kwargs, model, None, differ


def _named(shapes: Shapes, head_in: int | None, arch: str) -> Iterator[Candidate]:
    """The readings of a timm model outside the families inspect recognises by their keys, named by --arch: built on
    the meta device and kept when the file has its keys and shapes (under any prefix), a few aside at most."""
    try:
        with torch.device("meta"):
            model = _create(arch, {"pretrained": False, "num_classes": 0})
    except Exception:  # noqa: BLE001 - not a timm name (another library's arch)
        return
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = key_prefix(shapes, next(iter(keys))) if keys else None
    if prefix is None:
        return
    backbone = under_prefix(shapes, prefix)
    differ = sorted(k for k, v in keys.items() if backbone.get(k) != v)
    if len(differ) > max(3, len(keys) // 10):
        return
    same = [f"the file lacks or reshapes {len(differ)} of {arch}'s keys: {', '.join(differ[:4])}"] if differ else []
    yield from _readings(arch, {}, model, None, type(model).__name__, backbone, prefix, head_in, same)


def _depth(keys: Shapes, family: str) -> object:
    if family == "ViT":
        blocks = {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
        return max(blocks) + 1 if blocks else 0
    return _stage_depths(keys, "", "stages" if family == "ConvNeXt" else "layers")


def eval_transform(cfg: dict, source: str) -> tuple[dict, dict]:
    """The image fields timm's eval transform takes from a pretrained_cfg (or a train.py run's args): mean, std,
    interpolation, and the crop (crop_pct, crop_mode center -> shorter side, squash -> both sides), with `source`
    for each one the config holds."""
    image = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic"}
    sources = {}
    for key in ("mean", "std"):
        if cfg.get(key) is not None and len(cfg[key]) == 3:
            image[key], sources[key] = [round(float(v), 4) for v in cfg[key]], source
    if cfg.get("interpolation") in ("bicubic", "bilinear"):
        image["interpolation"], sources["interpolation"] = cfg["interpolation"], source
    mode = cfg.get("crop_mode") or "center"
    if cfg.get("crop_pct") is not None and mode in ("center", "squash"):
        image["resize"] = "shorter_side_center_crop" if mode == "center" else "squash"
        sources["resize"] = sources["crop_pct"] = source
        if float(cfg["crop_pct"]) < 1:
            image["crop_pct"] = round(float(cfg["crop_pct"]), 6)
    return image, sources


def _readings(name: str, kwargs: dict, model: nn.Module, native: int | None, family: str, backbone: Shapes,
              prefix: str, head_in: int | None, same: list[str]) -> Iterator[Candidate]:
    """One matched name's readings: logits or cls_mean as the head's width says, then each pooling and final norm."""
    width = int(model.num_features)
    classifier = backbone.get("head.weight") or backbone.get("head.fc.weight")
    base: dict = {"library": "timm", "arch": name}
    if native is not None:
        base["native_resolution"] = native
    options: dict = {"model_kwargs": kwargs} if kwargs else {}
    fixed: dict = {}
    if head_in and classifier and classifier[0] == head_in and classifier[1] == width:
        base["features"] = "logits"
        fixed = {"num_classes": head_in}
    elif head_in == 2 * width and hasattr(model, "num_prefix_tokens"):
        fixed = {"global_pool": "cls_mean"}
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = native or int((cfg.get("input_size") or (3, 224, 224))[-1])
    image, sources = eval_transform(cfg, f"timm's pretrained_cfg of {name}")
    image["resolutions"] = [size]
    grid = f", grid {size // int(model.patch_embed.patch_size[0])}" if "pos_embed" in backbone else ""
    blocks = ""
    if family in ("ViT", "ConvNeXt", "Swin"):  # the families known by their keys; another is named by --arch
        depth = _depth(backbone, family)
        blocks = f", {depth} {'blocks' if isinstance(depth, int) else 'blocks per stage'}"
    family = "EVA" if name.startswith("eva") else family
    text = (f"timm {family} {name}{' ' + str(kwargs) if kwargs else ''}, width {width}{blocks}{grid} ({size} px)"
            + (f", under `{prefix}`" if prefix else ""))
    if same and same[0].startswith("the file lacks"):
        notes: tuple[str, ...] = tuple(same)
    else:
        notes = (f"also the same keys: {', '.join(same[:4])} (what keys cannot show may differ: a _quickgelu "
                 "variant's activation, an _rms variant's norm; pass --arch to choose)",) if same else ()
    default_pool = _pool_type(model)  # a pool equal to the model's own default reads as `{}`
    others = [p for p in ("avg", "token") if p != default_pool] if hasattr(model, "num_prefix_tokens") else ["avg"]
    pools = [{}] if "global_pool" in fixed or "num_classes" in fixed else [
        {}, *({"global_pool": p} for p in others if p != default_pool)]
    if hasattr(model, "fc_norm") and any(p.get("global_pool") == "avg" for p in pools):
        # a ViT pooled by the mean takes its norm after the pooling (fc_norm) unless built with fc_norm=False, when
        # the norm runs before it as for the class token: one LayerNorm either way, which keys cannot tell apart
        pools.append({"global_pool": "avg", "model_kwargs": {**kwargs, "fc_norm": False}})
    has_norm = any(k.startswith(FINAL_NORMS) for k in model.state_dict())  # a ResNet has no final norm to drop
    for pool in pools:
        for norm in ({}, {"final_norm": False}) if has_norm else ({},):
            chosen = {**options, **fixed, **pool, **norm}
            yield Candidate({**base, **({"backbone": chosen} if chosen else {})}, text, image, notes, sources)


def _pool_type(model: nn.Module) -> str | None:
    """The model's own global pooling by timm's name ('avg', 'token', ...): a ViT keeps it as a string, a CNN as its
    pooling module (on the model, or on its head as in ConvNeXt)."""
    for owner in (model, getattr(model, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, str):
            return pool
        if isinstance(getattr(pool, "pool_type", None), str):
            return pool.pool_type
    return None


def _train_args(saved: Any) -> dict | None:
    """timm's train.py run arguments, as its CheckpointSaver keeps them (`args`, an argparse Namespace)."""
    args = saved.get("args") if isinstance(saved, dict) else None
    return dict(vars(args)) if args is not None and hasattr(args, "__dict__") else None


TIMM = register_library(TimmLibrary())
