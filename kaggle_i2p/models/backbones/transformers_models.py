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

import functools
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
from .base import Backbone, BackboneLibrary, Candidate, Captions, Shapes, as_captions

# The example's vision tower (and the size every tiny transformers model of the tests shares)
EXAMPLE_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "image_size": 64, "patch_size": 16}
VISION_SIDE = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}  # whole model -> its vision config
FOREIGN_PREFIXES = ("text_model.", "text_projection", "logit_scale", "logit_bias", "language_model.",
                    "language_projection.")  # a whole multimodal file's parts an image tower never uses


# BLIP-2's query tokens and the Q-Former's input norm open the Q-Former: before its first layer, as a ConvNeXt stage's
# downsample opens the stage (block -1)
QFORMER_INPUT = re.compile(r"^\.(query_tokens$|qformer\.layernorm\.)")
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
    fix = "write it with `model.config.save_pretrained(folder)`"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise EntryFieldError(f"{path} cannot be read as a transformers config.json ({type(err).__name__}: {err}); "
                              f"{fix}", "arch") from err
    model_type = data.get("model_type") if isinstance(data, dict) else None
    nested = _nested_vision_config(data, CONFIG_MAPPING) if model_type not in CONFIG_MAPPING else None
    if nested is not None:  # an HF Trainer save of a custom PreTrainedModel: its own model_type, the backbone's
        data, model_type = nested, nested["model_type"]  # config nested under vision_config
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise EntryFieldError(f"{path}: model_type {model_type!r} is not one transformers knows (transformers "
                              f"{__import__('transformers').__version__}); a config.json written by "
                              "`model.config.save_pretrained(folder)` names it", "arch")
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as err:  # noqa: BLE001 - a config its own class cannot read is one problem
        raise EntryFieldError(f"{path}: not a valid {model_type} config ({type(err).__name__}: {err}); {fix}",
                              "arch") from err


NESTED_CONFIGS = ("vision_config", "backbone_config", "encoder_config")  # where a wrapper keeps its backbone's config


def _nested_vision_config(data: Any, known: Any) -> dict | None:
    """The backbone's config a custom model's config.json nests (`vision_config` of a PreTrainedModel written by
    save_pretrained or HF Trainer), when the outer model_type is one transformers does not know and the nested one
    is; None otherwise."""
    if not isinstance(data, dict):
        return None
    for key in NESTED_CONFIGS:
        inner = data.get(key)
        if isinstance(inner, dict) and isinstance(inner.get("model_type"), str) and inner["model_type"] in known:
            return inner
    return None


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


CAPTIONERS = {"blip": "BlipForConditionalGeneration", "blip-2": "Blip2ForConditionalGeneration",
              "git": "GitForCausalLM", "vision-encoder-decoder": "VisionEncoderDecoderModel"}
INTERPOLATING_CAPTIONERS = ("blip", "blip-2")  # generate resamples their position embeddings: any resolution
# HF generate's keywords an entry may set (`backbone: {generate: {...}}`); sampling is left out: same images, same text
GENERATE_KEYS = {"max_new_tokens": int, "min_new_tokens": int, "num_beams": int, "repetition_penalty": float,
                 "length_penalty": float, "no_repeat_ngram_size": int}
DEFAULT_GENERATE = {"max_new_tokens": 30, "num_beams": 1}




# The files a tokenizer's vocabulary is saved in, by family: a fast tokenizer's, WordPiece (BERT, BLIP), BPE (GPT-2,
# OPT, GIT's), SentencePiece (T5, Flan-T5)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model")


def tokenizer_for(arch: str | Path) -> Any:
    """The tokenizer saved beside a captioner's config (`save_pretrained` of its processor), read offline."""
    from transformers import AutoTokenizer

    folder = config_path(arch).parent
    fix = "save the captioner's processor (or tokenizer) there with save_pretrained"
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise EntryFieldError(f"no tokenizer beside {config_path(arch).name} in {folder} (none of "
                              f"{', '.join(TOKENIZER_FILES)}): its captions could not be decoded; {fix}", "arch")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure of the tokenizer's files is this one problem
        raise EntryFieldError(f"the tokenizer beside {config_path(arch).name} in {folder} cannot be read ("
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); {fix}",
                              "arch") from err
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):  # transformers builds an empty one from a config alone
        raise EntryFieldError(f"the tokenizer beside {config_path(arch).name} in {folder} has no vocabulary (only "
                              f"its {len(tokenizer)} special tokens); {fix}", "arch")
    return tokenizer


def _vision_part(model: nn.Module) -> nn.Module:
    """The image encoder of a captioner: what the meta-device check runs at each resolution."""
    for name in ("vision_model", "encoder"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    return model.git.image_encoder  # GIT


def _caption_forward(self: nn.Module, pixel_values: torch.Tensor | None = None, *args: Any, **kwargs: Any
                     ) -> Captions | Any:
    """The captions of an image batch, generated deterministically and decoded (the prompt left out), a text per
    image (`Captions`). On the meta device (the architecture check) only the image encoder runs, for its shapes.
    Called as the model (by its own `generate`, with token ids), it is the model's own forward."""
    if args or kwargs:
        images = {"pixel_values": pixel_values} if pixel_values is not None else {}
        return type(self).forward(self, *args, **images, **kwargs)
    images = pixel_values
    options = self._i2p_generate
    interpolate = {"interpolate_pos_encoding": True} if self._i2p_interpolates else {}
    if images.is_meta:  # the others run at their native size only, which this check then enforces
        _vision_part(self)(pixel_values=images, **interpolate)
        return Captions([""] * len(images), images.device)
    extra: dict = {}
    prompt, echo = self._i2p_prompt_ids, self._i2p_prompt_echo
    if prompt:
        ids = torch.tensor([prompt] * len(images), device=images.device)
        extra = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = type(self).generate(self, pixel_values=images, do_sample=False, **options, **extra, **interpolate)
    out = out[:, echo:]  # the output starts with the prompt: the caption is the rest
    texts = [t.strip() for t in self._i2p_tokenizer.batch_decode(out, skip_special_tokens=True)]
    return as_captions(texts, images)


def _prompt_ids(model_type: str, tokenizer: Any, prompt: str, config: Any = None) -> tuple[list[int], int]:
    """A caption prompt's input ids as the family's processor makes them, and how many leading output tokens echo
    it: BLIP's `[CLS] prompt [SEP]` (its generate drops the `[SEP]`), GIT's `[CLS] prompt`, BLIP-2's image tokens
    (one per query) then the language model's `bos prompt` (a decoder-only model echoes them all; Flan-T5 reads them
    in its encoder and echoes none)."""
    if model_type == "blip-2":
        images = [config.image_token_index] * config.num_query_tokens
        if config.text_config.is_encoder_decoder:  # Flan-T5: the prompt as its tokenizer ends it, to the encoder
            return images + tokenizer(prompt)["input_ids"], 0
        words = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        ids = images + [config.text_config.bos_token_id, *words]  # OPT: bos, then the prompt
        return ids, len(ids)
    if not prompt:
        return [], 0
    if model_type == "blip":
        ids = tokenizer(prompt)["input_ids"]
        return ids, len(ids) - 1
    if model_type == "git":
        ids = [tokenizer.cls_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        return ids, len(ids)
    raise EntryFieldError(f"a prompt is supported for BLIP, BLIP-2 and GIT captioners, not {model_type}",
                          "backbone.prompt")


def saved_as_tied(model: nn.Module) -> nn.Module:
    """The model's tied weights (a language model's output layer sharing its input embeddings) as
    `save_pretrained` writes them: under their first name only. Its state dict leaves the aliases out, and loading
    fills them from their source, so a file with one copy fits strictly and the served weights stay tied."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        source = first.setdefault(id(tensor), name)
        if source != name:
            aliases[name] = source
    if not aliases:
        return model

    def drop(module: nn.Module, state: dict, prefix: str, metadata: Any) -> None:
        for alias in aliases:
            state.pop(prefix + alias, None)

    def fill(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
        for alias, source in aliases.items():
            if prefix + alias not in state and prefix + source in state:
                state[prefix + alias] = state[prefix + source]

    model.register_state_dict_post_hook(drop)
    model.register_load_state_dict_pre_hook(fill)
    return model


def _captioner(config: Any, options: Mapping, arch: str) -> nn.Module:
    """The HF captioner its config describes (random weights, its own keys), its forward giving its captions."""
    import transformers

    model_type = config.model_type
    model = getattr(transformers, CAPTIONERS[model_type])(config)
    tokenizer = tokenizer_for(arch)
    prompt = options.get("prompt") or ""
    model._i2p_generate = {**DEFAULT_GENERATE, **dict(options.get("generate") or {})}
    model._i2p_tokenizer = tokenizer
    model._i2p_interpolates = model_type in INTERPOLATING_CAPTIONERS
    model._i2p_prompt_ids, model._i2p_prompt_echo = _prompt_ids(model_type, tokenizer, prompt, config)
    # generate reads the forward's signature to choose its inputs (cache, positions): it sees the model's own
    forward = functools.wraps(type(model).forward)(lambda self, *args, **kwargs: _caption_forward(self, *args,
                                                                                                   **kwargs))
    model.forward = types.MethodType(forward, model)
    return saved_as_tied(model)


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
    feature_choices = ("pooled", "image_embeds", "query_mean", "cls", "mean", "caption")
    option_keys = {
        "generate": "with features: caption, HF generate's decoding: max_new_tokens (30), num_beams (1: greedy), "
                    "repetition_penalty, length_penalty, no_repeat_ngram_size, min_new_tokens (no sampling)",
        "prompt": "with features: caption, a text the caption starts from (e.g. 'a picture of'), kept out of it",
    }
    embedding_names = ("embeddings", "pre_layrnorm")
    no_weight_decay_names = ("class_embedding", "position_embedding", "query_tokens", "position_ids")
    classifier_prefixes = ("classifier.", "head.", "fc.")

    def block_of(self, name: str) -> tuple[int, int] | None:
        """(stage, block) by HF's names: the Q-Former (its query tokens and input norm, then its layers) after the
        vision model's layers; ConvNeXt/Swin stages."""
        dotted = f".{name}"
        if QFORMER_INPUT.search(dotted):
            return 1, -1
        for pattern, stage in HF_BLOCKS:
            match = pattern.search(dotted)
            if match:
                return (stage, int(match[1])) if stage is not None else (int(match[1]), int(match[2]))
        return None

    def option_problems(self, features: str | None, options: Mapping | None) -> list[tuple[str, str]]:
        """The base checks; `generate` and `prompt` only for a captioner, each generate keyword of its type."""
        problems = super().option_problems(features, options)
        options = options or {}
        for key in ("generate", "prompt"):
            if key in options and features != "caption":
                problems.append((f"backbone.{key}", "only for a caption tower (features: caption)"))
        generate = options.get("generate")
        if generate is not None and not isinstance(generate, Mapping):
            problems.append(("backbone.generate", f"{generate!r} must map generate keywords to values, e.g. "
                                                  "{max_new_tokens: 30, num_beams: 3}"))
        for key, value in (generate.items() if isinstance(generate, Mapping) else ()):
            kind = GENERATE_KEYS.get(key)
            if kind is None:
                problems.append((f"backbone.generate.{key}", f"is not one of {', '.join(GENERATE_KEYS)} (decoding "
                                                             "is deterministic: no sampling)"))
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and (
                    not isinstance(value, int) or value < 1)) or value <= 0:
                problems.append((f"backbone.generate.{key}", f"{value!r} must be a positive "
                                                             f"{'integer' if kind is int else 'number'}"))
        if "prompt" in options and not isinstance(options["prompt"], str):
            problems.append(("backbone.prompt", f"{options['prompt']!r} must be a text"))
        return problems

    def arch_is_path(self, arch: str) -> bool:
        """Every transformers `arch` is a local file or folder: the hub is never asked."""
        return True

    def arch_identity(self, arch: str) -> Any:
        return json.loads(config_path(arch).read_text(encoding="utf-8"))

    def example(self, folder: Path, features: str | None = None) -> str | None:
        """A tiny CLIP vision tower's folder (`config.json`, as `save_pretrained` leaves it); for captions, a tiny
        BLIP captioner's (`write_example_captioner`)."""
        import transformers as hf

        if features == "caption":
            return write_example_captioner(Path(folder) / "tiny_blip").name
        if features is not None:
            return None
        model = Path(folder) / "tiny_hf_clip"
        model.mkdir(parents=True, exist_ok=True)
        config = hf.CLIPVisionConfig(**EXAMPLE_VISION, projection_dim=24)
        (model / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        return model.name

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
        if features == "caption":
            if model_type not in CAPTIONERS:
                raise EntryFieldError(f"model_type {model_type} is not a captioner; captioners: "
                                      f"{', '.join(CAPTIONERS)}", "features")
            return Backbone(_captioner(config, options or {}, arch), 0)
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

    def layouts_for(self, arch: str) -> Any:
        """The layouts below, and each again with transformers' own renamings of its older key names (a file that
        transformers 4 saved, or that `save_pretrained` wrote: ViT's `attention.attention.key` is transformers 5's
        `attention.k_proj`)."""
        renamings = _renamings(str(config_path(arch)))

        def layouts(state: dict[str, torch.Tensor], backbone_keys: set[str]
                    ) -> Iterator[tuple[dict[str, torch.Tensor], str]]:
            yield from self.checkpoint_layouts(state, backbone_keys)
            if not renamings:
                return
            from transformers.core_model_loading import apply_renamings

            renamed = {apply_renamings(k, renamings): v for k, v in state.items()}
            if renamed != state:  # the backbone's part (the head, beside it, is the caller's)
                yield ({k: v for k, v in renamed.items() if k in backbone_keys},
                       "its keys as transformers renames them on loading")
                for part, note in self.checkpoint_layouts(renamed, backbone_keys):
                    yield part, f"{note}, its keys as transformers renames them on loading"

        return layouts

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
    # --- the text side: a CLIP or SigLIP model's text tower (`get_text_features`), its tokenizer beside its config
    text_side = True

    def reads_text_arch(self, arch: str) -> bool:
        """A save_pretrained folder (or its config.json) of a model with a text tower (CLIP, SigLIP)."""
        if not config_path(arch).is_file():
            return False
        try:
            return _text_model_class(arch)[0] is not None
        except Exception:  # noqa: BLE001 - not a config this library reads as a text tower
            return False

    def text_width(self, arch: str) -> int:
        """From the config: CLIP projects to `projection_dim`; SigLIP's text head to `projection_size` (its width by
        default)."""
        config = _text_model_class(arch, required=True)[1]
        text = getattr(config, "text_config", config)
        return int(getattr(config, "projection_dim", None) or getattr(text, "projection_size", None)
                   or text.hidden_size)

    def text_problem(self, arch: str, checkpoint: Path) -> str | None:
        """`checkpoint` (the folder or its weights) against the model `arch` builds, from its keys and shapes."""
        from ..checkpoints import whole_model_problem

        try:
            cls, config = _text_model_class(arch, required=True)
            with torch.device("meta"):
                expected = cls(config).state_dict()
        except Exception as err:  # noqa: BLE001 - a config that builds no text tower is one problem
            return str(err)
        return whole_model_problem(expected, checkpoint, f"the whole {arch} model",
                                   "the model's save_pretrained folder")

    def text_encoder(self, arch: str, checkpoint: Path, device: str, batch_size: int):
        """`get_text_features` of the model with the checkpoint's weights, tokenized as the model was trained (SigLIP
        pads to its full length, CLIP to the longest text)."""
        import numpy as np
        from transformers import AutoTokenizer

        from ...core.errors import I2PError
        from ..checkpoints import read_state_dict, strip_prefixes

        cls, config = _text_model_class(arch, required=True)
        # transformers' own loader: it materialises what a meta-device build of the class (the checks) leaves
        model, info = cls.from_pretrained(None, config=config, output_loading_info=True,
                                          state_dict=strip_prefixes(read_state_dict(Path(checkpoint))))
        wrong = [f"{what}: {', '.join(sorted(keys)[:4])}" for what, keys in info.items() if keys]
        if wrong:
            raise I2PError(f"{checkpoint} is not the whole {arch} model ({'; '.join(wrong)})")
        model = model.to(device).eval()
        folder = config_path(arch).parent
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as err:  # noqa: BLE001 - any failure of the tokenizer's files is this one problem
            raise I2PError(f"no readable tokenizer beside {config_path(arch)} ({type(err).__name__}); save the "
                           "model's processor (or tokenizer) there with save_pretrained") from err
        text_config = getattr(model.config, "text_config", model.config)
        length = int(getattr(text_config, "max_position_embeddings", 77))
        padding = "max_length" if model.config.model_type.startswith("siglip") else "longest"

        def embed(texts: list[str]) -> np.ndarray:
            chunks = []
            with torch.inference_mode():
                for start in range(0, len(texts), batch_size):
                    tokens = tokenizer(texts[start:start + batch_size], padding=padding, truncation=True,
                                       max_length=length, return_tensors="pt").to(device)
                    mask = None if padding == "max_length" else tokens.get("attention_mask")
                    features = _text_features(model, tokens["input_ids"], mask)
                    chunks.append(nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
            return np.concatenate(chunks) if chunks else np.zeros((0, self.text_width(arch)), np.float32)

        return embed

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
        preprocess, sources = _preprocessor(path.parent, config.model_type)
        image = {"resolutions": [size], **preprocess}
        family = (f"transformers {config.model_type} ({type(config).__name__}), width "
                  f"{getattr(vision, 'hidden_size', '?')}, {getattr(vision, 'num_hidden_layers', '?')} layers, "
                  f"patch {getattr(vision, 'patch_size', '?')}, {size} px")
        choices = {"blip-2": ("query_mean", "pooled"), "clip": ("pooled", "image_embeds"),
                   "clip_vision_model": ("pooled", "image_embeds")}.get(config.model_type, ("pooled", "cls", "mean"))
        for features in choices:
            note = () if len(choices) < 3 else ("features: pooled, cls and mean have the same keys; set the one "
                                                "trained (pooled: the model's pooler_output)",)
            yield Candidate({"library": "transformers", "arch": str(path), "features": features},
                            f"{family}, features {features}", image, note, sources)


@functools.lru_cache(maxsize=16)
def _text_model_class(arch: str, required: bool = False) -> tuple[type | None, Any]:
    """(the class `AutoModel` builds for `arch`'s config when it has a text tower (`get_text_features`: CLIP,
    SigLIP), found without building it, else None, or with `required` an error naming what it is; the config)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    from ...core.errors import I2PError

    config = read_config(arch)
    found = MODEL_MAPPING[type(config)] if type(config) in MODEL_MAPPING else ()
    classes = found if isinstance(found, (list, tuple)) else (found,)
    chosen = next((cls for cls in classes if hasattr(cls, "get_text_features")), None)
    if chosen is None and required:
        raise I2PError(f"{config_path(arch)}: a {config.model_type} model has no text tower (get_text_features); "
                       "give a CLIP or SigLIP model's folder")
    return chosen, config


def _text_features(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The projected text embedding, as transformers 4 (a tensor) and 5 (an output, its pooler_output) return it."""
    out = model.get_text_features(input_ids=ids, **({"attention_mask": mask} if mask is not None else {}))
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _renamings(config_file: str) -> list:
    """transformers' own key renamings for the model a config describes (what `from_pretrained` applies to older
    names), read from the model built on the meta device; none when it has none or cannot be built."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        config = read_config(config_file)
        model_type = config.model_type
        with torch.device("meta"):
            if model_type in CAPTIONERS:
                import transformers

                model = getattr(transformers, CAPTIONERS[model_type])(config)
            elif model_type == "blip-2":
                model = Blip2QueryTower(config)
            else:
                model = TransformersLibrary._model(config, "pooled")
        found = []
        for module in ([model] if not isinstance(model, Blip2QueryTower) else [model.vision_model, model.qformer]):
            found += [c for c in get_model_conversion_mapping(module, add_legacy=True) if isinstance(c, WeightRenaming)]
        return found
    except Exception:  # noqa: BLE001 - no renamings: the file is read by the other layouts
        return []


HF_KEYS = ("embeddings.patch_embedding.weight", "embeddings.patch_embeddings.projection.weight", "query_tokens",
           "embeddings.patch_embeddings.weight")
HF_IMAGE = {"siglip": ([0.5] * 3, [0.5] * 3), "clip": ([0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758]),
            "blip-2": ([0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758])}
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as preprocessor_config.json holds them


def _preprocessor(folder: Path, model_type: str) -> tuple[dict, dict]:
    """The image fields an HF processor's preprocessor_config.json beside the config says (mean, std, resample,
    size, crop_size, do_center_crop: the eval crop as crop_pct = crop / shortest edge; resolutions the crop), with
    where each came from; else the family's usual mean/std, which the user confirms."""
    family = next((k for k in HF_IMAGE if model_type.startswith(k)), None)
    mean, std = HF_IMAGE.get(family, ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    image: dict = {"mean": mean, "std": std, "interpolation": "bicubic"}
    path = folder / "preprocessor_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        return image, {}
    source, sources = "preprocessor_config.json", {}
    if isinstance(data.get("image_mean"), list) and isinstance(data.get("image_std"), list):
        image |= {"mean": [round(float(v), 4) for v in data["image_mean"]],
                  "std": [round(float(v), 4) for v in data["image_std"]]}
        sources |= {"mean": source, "std": source}
    if data.get("resample") in RESAMPLE:
        image["interpolation"], sources["interpolation"] = RESAMPLE[data["resample"]], source
    size, crop = data.get("size"), data.get("crop_size")
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    size = {"shortest_edge": size} if isinstance(size, int) else size
    cropped = data.get("do_center_crop", crop is not None) and isinstance(crop, dict) and crop.get("height")
    if isinstance(size, dict) and data.get("do_resize", True):
        if size.get("shortest_edge"):
            image["resize"] = "shorter_side_center_crop"
            edge = int(size["shortest_edge"])
            target = int(crop["height"]) if cropped else edge
            if target < edge:
                image["crop_pct"] = round(target / edge, 6)
            image["resolutions"] = [target]
        elif size.get("height") and size.get("width"):
            image["resize"] = "squash"
            target = int(crop["height"]) if cropped else int(size["height"])
            if target < int(size["height"]):
                image["crop_pct"] = round(target / int(size["height"]), 6)
            image["resolutions"] = [target]
        sources |= {"resize": source, "crop_pct": source, "resolutions": source}
    return image, sources


EXAMPLE_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "painting", "city", "night", "forest", "by",
                 "artstation", "portrait", "sky", "castle", "river", "golden", "hour", "highly", "detailed", "oil",
                 "canvas", "neon", "street", "rain", "mountain", "sunset", "fantasy", "art", "digital", "concept"]
EXAMPLE_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
EXAMPLE_QFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
           "cross_attention_frequency": 1}
EXAMPLE_OPT = {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 1, "ffn_dim": 64, "num_attention_heads": 2,
       "vocab_size": 64, "word_embed_proj_dim": 32}


def write_example_captioner(folder: str | Path, family: str = "blip", seed: int = 0) -> Path:
    """A tiny transformers captioner as `save_pretrained` leaves it (config.json, model.safetensors, and the
    processor's tokenizer beside them), random weights: blip, blip2 (OPT), blip2_t5, git or
    vision-encoder-decoder (ViT + BERT)."""
    import transformers as hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *EXAMPLE_WORDS]
    words += [f"w{i}" for i in range(64 - len(words))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    hf.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    ids = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0, "vocab_size": 64}
    text = {**EXAMPLE_TEXT, **ids}
    torch.manual_seed(seed)
    blip2 = {"vision_config": EXAMPLE_VISION, "qformer_config": EXAMPLE_QFORMER, "num_query_tokens": 4,
             "image_token_index": 63}
    if family == "blip":
        config = hf.BlipConfig(vision_config=EXAMPLE_VISION, text_config={**text, "sep_token_id": 3,
                                                                           "encoder_hidden_size": 32})
        model = hf.BlipForConditionalGeneration(config)
    elif family == "git":
        model = hf.GitForCausalLM(hf.GitConfig(vision_config=EXAMPLE_VISION, **text))
    elif family == "blip2":  # OPT's decoder under the Q-Former's 4 queries, its image token the vocab's last
        text_config = {**EXAMPLE_OPT, "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
        model = hf.Blip2ForConditionalGeneration(hf.CONFIG_MAPPING["blip-2"](**blip2, text_config=text_config))
    elif family == "blip2_t5":  # Flan-T5 under the Q-Former: the prompt goes to its encoder
        t5 = {"model_type": "t5", "vocab_size": 64, "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 1,
              "num_decoder_layers": 1, "num_heads": 2, "pad_token_id": 0, "eos_token_id": 3,
              "decoder_start_token_id": 0}
        model = hf.Blip2ForConditionalGeneration(hf.CONFIG_MAPPING["blip-2"](**blip2, text_config=t5))
    else:
        config = hf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
            hf.ViTConfig(**EXAMPLE_VISION), hf.BertConfig(**text, is_decoder=True, add_cross_attention=True))
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 0, 3
        model = hf.VisionEncoderDecoderModel(config)
    if family.startswith("blip2"):
        for parameter in model.parameters():  # drawn wide: a tiny random OPT otherwise repeats one token
            torch.nn.init.normal_(parameter, std=0.3)
    model.save_pretrained(str(folder))
    return folder


TRANSFORMERS = register_library(TransformersLibrary())
