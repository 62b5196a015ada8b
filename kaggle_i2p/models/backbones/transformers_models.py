"""HF transformers as a model library: an image model from a local `config.json` (or the model's folder), built
offline with random weights (the hub is never asked). Families, by the config's `model_type`:

- `clip` / `clip_vision_model`: `CLIPVisionModel` (features `pooled`: the post-layernorm class token) or
  `CLIPVisionModelWithProjection` (`image_embeds`); a whole `CLIPConfig` gives its vision side.
- `siglip` / `siglip_vision_model`: `SiglipVisionModel` (`pooled`: its attention-pooling head's output).
- `blip-2`: `Blip2VisionModel` + the learned query tokens + `Blip2QFormerModel` (`query_mean`: the mean of the query
  outputs, the 1st place's tower), or the vision model alone (`pooled`); `blip_2_vision_model` is the latter.
- anything else `AutoModel` builds from a vision config (ViT, DINOv2, ConvNeXt, Swin, ...): `pooled`
  (`pooler_output`).

Every family also offers `cls` (the first token of the last hidden state) and `mean` (its mean over the tokens, or
over the feature map). The backbone's keys are the model class's own (`state_dict()` of the class transformers 5
builds); files saved by transformers 4 (`vision_model.*` inside `CLIPVisionModel`) and whole CLIP / BLIP-2 models are
read by the layouts below. Other input sizes use the model's own position interpolation
(`interpolate_pos_encoding=True`), so multi-resolution TTA works on ViTs.
"""

from __future__ import annotations

import inspect
import json
import re
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.errors import EntryFieldError
from ...core.registry import register_library
from .base import Backbone, BackboneLibrary, Candidate, Shapes

VISION_SIDE = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}  # whole model -> its vision config
FOREIGN_PREFIXES = ("text_model.", "text_projection", "logit_scale", "logit_bias", "language_model.",
                    "language_projection.")  # a whole multimodal file's parts an image tower never uses


HF_BLOCKS = ((re.compile(r"\.qformer\.encoder\.layer\.(\d+)\."), 1),  # BLIP-2: after the vision model's layers
             (re.compile(r"\.encoder\.stages\.(\d+)\.layers\.(\d+)\."), None),  # ConvNeXt (stage, block)
             (re.compile(r"\.encoder\.layers\.(\d+)\.blocks\.(\d+)\."), None),  # Swin (stage, block)
             (re.compile(r"\.encoder\.layers?\.(\d+)\."), 0))  # CLIP, SigLIP, ViT, DINOv2, BLIP-2's vision


def config_path(arch: str | Path) -> Path:
    """The config.json an `arch` names: the file, or the one in the model's folder."""
    path = Path(arch)
    return path / "config.json" if path.is_dir() else path


def read_config(arch: str | Path) -> Any:
    """The transformers config a local `config.json` (or a model folder) describes, built by its `model_type`'s own
    config class; nothing downloaded."""
    from transformers import CONFIG_MAPPING

    path = config_path(arch)
    data = json.loads(path.read_text(encoding="utf-8"))
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{path}: model_type {model_type!r} is not one transformers knows; a config.json written "
                         "by `model.config.save_pretrained(folder)` names it")
    return CONFIG_MAPPING[model_type].from_dict(data)


def _vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


class Blip2QueryTower(nn.Module):
    """BLIP-2's image side: the vision model, the learned query tokens cross-attending to its tokens in the
    Q-Former, and the queries' outputs pooled; keys as in `Blip2Model` (`vision_model.*`, `query_tokens`,
    `qformer.*`)."""

    def __init__(self, config: Any):
        super().__init__()
        from transformers import Blip2QFormerModel, Blip2VisionModel

        self.config = config
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(config.qformer_config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        # every image token is attended to: no mask, which is BLIP-2's all-ones mask (and runs on the meta device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image)
        return out.last_hidden_state.mean(dim=1)


def _select(output: Any, features: str) -> torch.Tensor:
    """The tensor `features` names from an HF model's output."""
    if features in ("pooled", "image_embeds"):
        value = output.pooler_output if features == "pooled" else output.image_embeds
        if value is None:
            raise ValueError(f"the model gives no {features} output")
        return value.flatten(1)
    hidden = output.last_hidden_state
    if features == "cls":
        return hidden[:, 0]
    return hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden.mean(dim=1)


def _features_forward(self: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's own forward on the image batch, giving the one tensor the entry's `features` names."""
    output = type(self).forward(self, pixel_values=images, **self._i2p_forward_kwargs)
    return _select(output, self._i2p_features)


def _serve(model: nn.Module, features: str) -> nn.Module:
    """The HF model itself (its keys unchanged), its forward returning `features` as a (B, width) tensor."""
    takes = inspect.signature(type(model).forward).parameters
    model._i2p_forward_kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in takes else {}
    model._i2p_features = features
    model.forward = types.MethodType(_features_forward, model)
    return model


class TransformersLibrary(BackboneLibrary):
    """HF transformers image models from local configs (CLIP, SigLIP, BLIP-2, and AutoModel's vision models)."""

    name = "transformers"
    arch_example = "clip-vit-large-patch14/config.json"
    arch_file_suffixes = (".json",)
    arch_folder_file = "config.json"
    feature_choices = ("pooled", "image_embeds", "query_mean", "cls", "mean")
    embedding_names = ("embeddings", "pre_layrnorm", "query_tokens")
    no_weight_decay_names = ("class_embedding", "position_embedding", "query_tokens", "position_ids")
    classifier_prefixes = ("classifier.", "head.", "fc.")

    def block_of(self, name: str) -> tuple[int, int] | None:
        """(stage, block) by HF's names: the Q-Former's layers after the vision model's, ConvNeXt/Swin stages."""
        dotted = f".{name}"
        for pattern, stage in HF_BLOCKS:
            match = pattern.search(dotted)
            if match:
                return (stage, int(match[1])) if stage is not None else (int(match[1]), int(match[2]))
        return None

    def arch_is_path(self, arch: str) -> bool:
        """Every transformers `arch` is a local file or folder: the hub is never asked."""
        return True

    def arch_identity(self, arch: str) -> Any:
        return json.loads(config_path(arch).read_text(encoding="utf-8"))

    def build(self, arch: str, native_resolution: int | None, classes: int, features: str | None = None,
              options: Mapping | None = None) -> Backbone:
        """The model its config describes, random weights, its forward giving `features` (default: `query_mean`
        for BLIP-2, `pooled` for the rest)."""
        if classes:
            raise ValueError("a transformers image tower gives features, not a bank's classes: use score: embedding")
        config = read_config(arch)
        model_type = config.model_type
        if native_resolution is not None:
            _vision_config(config).image_size = native_resolution
        if model_type == "blip-2":
            features = features or "query_mean"
            if features == "query_mean":
                return Backbone(Blip2QueryTower(config), int(config.qformer_config.hidden_size))
            config = config.vision_config
            model_type = config.model_type
        features = features or "pooled"
        if features == "query_mean":
            raise EntryFieldError(f"query_mean is BLIP-2's (model_type blip-2), not {model_type}'s", "features")
        model = self._model(config, features)
        return Backbone(_serve(model, features), self._width(model, features))

    @staticmethod
    def _model(config: Any, features: str) -> nn.Module:
        import transformers

        model_type = config.model_type
        if model_type in VISION_SIDE:  # a whole CLIP / SigLIP config: its image side
            top = config
            config = config.vision_config
            if model_type == "clip":
                config.projection_dim = top.projection_dim
            model_type = VISION_SIDE[model_type]
        if features == "image_embeds":
            if model_type != "clip_vision_model":
                raise EntryFieldError(f"image_embeds is CLIP's projected embedding, not {model_type}'s", "features")
            return transformers.CLIPVisionModelWithProjection(config)
        classes = {"clip_vision_model": transformers.CLIPVisionModel,
                   "siglip_vision_model": transformers.SiglipVisionModel,
                   "blip_2_vision_model": transformers.Blip2VisionModel}
        if model_type in classes:
            return classes[model_type](config)
        model = transformers.AutoModel.from_config(config)
        if getattr(model, "main_input_name", None) != "pixel_values":
            raise ValueError(f"{type(model).__name__} is not an image model (its input is {model.main_input_name})")
        return model

    @staticmethod
    def _width(model: nn.Module, features: str) -> int:
        config = model.config
        if features == "image_embeds":
            return int(config.projection_dim)
        width = getattr(model, "num_features", None)  # Swin
        if width is None:
            sizes = getattr(config, "hidden_sizes", None)  # ConvNeXt, ResNet
            width = sizes[-1] if sizes else config.hidden_size
        return int(width)

    def patch_size(self, backbone: nn.Module) -> int | None:
        config = getattr(backbone, "config", None)
        size = getattr(_vision_config(config), "patch_size", None) if config is not None else None
        return int(size) if isinstance(size, int) else None

    def checkpoint_layouts(self, state: dict[str, torch.Tensor], backbone_keys: set[str]
                           ) -> Iterator[tuple[dict[str, torch.Tensor], str]]:
        """A whole CLIP / SigLIP / BLIP-2 file (text tower, language model): the image side this tower uses, saved
        by transformers 5 or by 4 (`vision_model.` around the vision model's keys)."""
        if not any(k.startswith(FOREIGN_PREFIXES) for k in state):
            return
        kept = {k: v for k, v in state.items() if not k.startswith(FOREIGN_PREFIXES)}
        for prefix in ("", "vision_model."):
            inner = {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v for k, v in kept.items()}
            used = {k: v for k, v in inner.items() if k in backbone_keys}
            yield used, (f"a whole transformers model: its image side ({len(state) - len(used)} tensors of the "
                         "file left out)")


    # --- inspect
    def propose(self, shapes: Shapes, head_in: int | None, source: Path, arch: str | None = None
                ) -> Iterator[Candidate]:
        """An HF image model (CLIP, SigLIP, BLIP-2, ViT, DINOv2, ConvNeXt, Swin) by its embeddings' keys, built
        from the config.json `save_pretrained` wrote beside the file (or `arch`); each of its family's outputs in
        turn, the one its keys fit kept. Without a config, one message: the keys cannot say the attention heads."""
        if not any(k.endswith(HF_KEYS) or ".embeddings.patch_embedding" in k for k in shapes):
            return
        path = config_path(arch) if arch else next((p for p in (source.parent / "config.json",) if p.is_file()), None)
        if path is None:
            raise EntryFieldError("an HF transformers image model, whose config.json (written beside the weights by "
                                  "save_pretrained) inspect needs, since the keys do not hold its attention heads: "
                                  "put it beside the file or pass --arch CONFIG", "arch")
        config = read_config(path)
        vision = _vision_config(config)
        size = getattr(vision, "image_size", 224)
        size = int(size if isinstance(size, int) else size[0])
        image = {**_preprocessor(path.parent, config.model_type), "resolutions": [size]}
        family = (f"transformers {config.model_type} ({type(config).__name__}), width "
                  f"{getattr(vision, 'hidden_size', '?')}, {getattr(vision, 'num_hidden_layers', '?')} layers, "
                  f"patch {getattr(vision, 'patch_size', '?')}, {size} px")
        choices = {"blip-2": ("query_mean", "pooled"), "clip": ("pooled", "image_embeds"),
                   "clip_vision_model": ("pooled", "image_embeds")}.get(config.model_type, ("pooled", "cls", "mean"))
        for features in choices:
            note = () if len(choices) < 3 else ("features: pooled, cls and mean have the same keys; set the one "
                                                "trained (pooled: the model's pooler_output)",)
            yield Candidate({"library": "transformers", "arch": str(path), "features": features},
                            f"{family}, features {features}", image, note)


HF_KEYS = ("embeddings.patch_embedding.weight", "embeddings.patch_embeddings.projection.weight", "query_tokens",
           "embeddings.patch_embeddings.weight")
HF_IMAGE = {"siglip": ([0.5] * 3, [0.5] * 3), "clip": ([0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758]),
            "blip-2": ([0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758])}
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as preprocessor_config.json holds them


def _preprocessor(folder: Path, model_type: str) -> dict:
    """mean, std and interpolation from the preprocessor_config.json beside the config, else the family's usual."""
    family = next((k for k in HF_IMAGE if model_type.startswith(k)), None)
    mean, std = HF_IMAGE.get(family, ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    image = {"mean": mean, "std": std, "interpolation": "bicubic"}
    path = folder / "preprocessor_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    if isinstance(data.get("image_mean"), list) and isinstance(data.get("image_std"), list):
        image |= {"mean": [round(float(v), 4) for v in data["image_mean"]],
                  "std": [round(float(v), 4) for v in data["image_std"]]}
    if data.get("resample") in RESAMPLE:
        image["interpolation"] = RESAMPLE[data["resample"]]
    return image


TRANSFORMERS = register_library(TransformersLibrary())
