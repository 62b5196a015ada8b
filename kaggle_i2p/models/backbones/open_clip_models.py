"""open_clip as a model library: an image tower by registered config name or from a model-config `.json`, built
offline (no pretrained tag); its ViTs get their position embeddings resampled by open_clip's `resize_pos_embed`."""

from __future__ import annotations

import json
import re
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
    Captions,
    Shapes,
    as_captions,
    key_prefix,
    under_prefix,
)

# The example: a tiny CLIP ViT in open_clip's own model-config format (native size 64, patch 16)
EXAMPLE_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
CLIP_IMAGE = {"mean": [0.4815, 0.4578, 0.4082], "std": [0.2686, 0.2613, 0.2758], "interpolation": "bicubic"}


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


CLIP_KEYS = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")  # what open_clip's CLIP takes of a model config


def _pos_embed_to_grid(positional_embedding: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """open_clip's own `resize_pos_embed` (class token kept, the patch grid resampled)."""
    from open_clip.model import resize_pos_embed

    target = nn.Module()
    target.visual = nn.Module()
    target.visual.grid_size = tuple(grid)
    state = {"visual.positional_embedding": positional_embedding}
    resize_pos_embed(state, target)
    return state["visual.positional_embedding"]


def _patch(visual: nn.Module) -> tuple[int, int]:
    size = visual.patch_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def resize_for_input(visual: nn.Module, height: int, width: int) -> dict[str, torch.Tensor]:
    """A copy of the visual tower's position embedding resampled for a height x width input."""
    patch_h, patch_w = _patch(visual)
    stored = visual.positional_embedding  # resampled in fp32 (fp16 weights too: bicubic wants the precision)
    grid = (height // patch_h, width // patch_w)
    return {"positional_embedding": _pos_embed_to_grid(stored.float(), grid).to(stored.dtype)}


class OpenClipLibrary(BackboneLibrary):
    """open_clip image towers (ViT, and timm-trunk ConvNeXt)."""

    name = "open_clip"
    arch_example = "ViT-L-14-336"
    arch_file_suffixes = (".json",)
    block_patterns = CONVNEXT_BLOCKS + TRANSFORMER_BLOCKS  # for layer-wise LR decay
    # its own ViT's names, and those of the timm trunks it wraps (`trunk.*`)
    embedding_names = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_embed", "pos_embed",
                       "cls_token", "reg_token", "stem", "rope")
    no_weight_decay_names = ("positional_embedding", "class_embedding", "pos_embed", "cls_token")

    feature_choices = ("embedding", "caption")
    option_keys = {"generate": "with features: caption (a CoCa model), greedy decoding: max_new_tokens (30), "
                               "repetition_penalty"}

    def option_problems(self, features: str | None, options: Mapping | None) -> list[tuple[str, str]]:
        problems = super().option_problems(features, options)
        generate = (options or {}).get("generate")
        if generate is not None and features != "caption":
            problems.append(("backbone.generate", "only for a caption tower (a CoCa model)"))
        for key, value in (generate.items() if isinstance(generate, Mapping) else ()):
            if key not in COCA_GENERATE:
                problems.append((f"backbone.generate.{key}", f"is not one of {', '.join(COCA_GENERATE)} (CoCa is "
                                                             "decoded here, deterministically, by its own decoder)"))
            elif isinstance(value, bool) or not isinstance(value, COCA_GENERATE[key]) or value <= 0:
                problems.append((f"backbone.generate.{key}", f"{value!r} must be a positive number"))
        return problems

    def example(self, folder: Path, features: str | None = None) -> str | None:
        """A tiny CLIP ViT's model config (`EXAMPLE_CONFIG`), as open_clip's JSON configs are."""
        if features is not None:
            return None
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / "tiny_open_clip_vit.json"
        path.write_text(json.dumps(EXAMPLE_CONFIG, indent=1))
        return path.name

    def build(self, arch: str, native_resolution: int | None, classes: int, features: str | None = None,
              options: Mapping | None = None) -> Backbone:
        """An open_clip image tower (its embedding); ViTs get a position-embedding resampler for other sizes. With
        `features: caption`, a whole CoCa model whose forward gives its greedy captions."""
        from open_clip.model import _build_vision_tower
        from open_clip.transformer import VisionTransformer

        if classes:
            raise ValueError("an open_clip image tower gives embeddings, not class logits: use score: embedding "
                             "with a bank whose keys are the matching CLIP text embeddings")
        config = open_clip_config(arch)
        if features == "caption":
            return Backbone(_coca(config, arch, options or {}), 0)
        vision_cfg = dict(config["vision_cfg"])
        if native_resolution is not None:
            vision_cfg["image_size"] = native_resolution
        visual = _build_vision_tower(config["embed_dim"], vision_cfg, quick_gelu=config.get("quick_gelu", False))
        if not isinstance(visual, VisionTransformer):  # timm-trunk (ConvNeXt) towers run at any size as they are
            return Backbone(visual, int(config["embed_dim"]))
        size = vision_cfg.get("image_size", 224)
        return Backbone(visual, int(config["embed_dim"]), resize_for_input, size if isinstance(size, int) else size[0],
                        ("positional_embedding",))

    def patch_size(self, backbone: nn.Module) -> int | None:
        if hasattr(backbone, "positional_embedding") and hasattr(backbone, "patch_size"):
            return int(_patch(backbone)[0])
        trunk = getattr(getattr(backbone, "trunk", None), "patch_embed", None)  # a timm-trunk ViT
        size = getattr(trunk, "patch_size", None)
        return None if size is None else int(size[0] if isinstance(size, (tuple, list)) else size)

    def position_grid(self, backbone: nn.Module) -> tuple[int, int] | None:
        grid = getattr(backbone, "grid_size", None)
        if grid is None or "positional_embedding" not in dict(backbone.named_parameters()):
            return None
        return int(grid[0]), int(grid[1])

    def resample_position_embeddings(self, state: Mapping[str, torch.Tensor], backbone: nn.Module
                                     ) -> dict[str, torch.Tensor]:
        """open_clip ViT `positional_embedding` (1 + gh * gw, C) resampled by open_clip's `resize_pos_embed`."""
        out = dict(state)
        grid = self.position_grid(backbone)
        value = state.get("positional_embedding")
        if value is None or grid is None or tuple(backbone.positional_embedding.shape) == tuple(value.shape):
            return out
        out["positional_embedding"] = _pos_embed_to_grid(value, grid)
        return out

    def unwrap_checkpoint(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """A full CLIP checkpoint (`visual.*` beside the text tower) as its visual tower's keys."""
        if not any(k.startswith("visual.") for k in state):
            return state, []
        dropped = sum(not k.startswith("visual.") for k in state)
        visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        return visual, [f"an open_clip CLIP checkpoint: its visual tower ({dropped} text-side tensors left out)"]


    # --- inspect
    # --- the text side
    text_side = True

    def reads_text_arch(self, arch: str) -> bool:
        """An open_clip model name, or a model-config .json with a text tower (`text_cfg`)."""
        try:
            return "text_cfg" in open_clip_config(arch)
        except (ValueError, OSError):
            return False

    def text_width(self, arch: str) -> int:
        return int(open_clip_config(arch)["embed_dim"])

    def text_problem(self, arch: str, checkpoint: Path) -> str | None:
        """`checkpoint` against the whole CLIP `arch` (both towers), from its keys and shapes alone."""
        import open_clip

        from ..checkpoints import whole_model_problem

        try:
            config = open_clip_config(arch)
            with torch.device("meta"):
                expected = open_clip.model.CLIP(**{k: v for k, v in config.items() if k in CLIP_KEYS}).state_dict()
        except Exception as err:  # noqa: BLE001 - an unknown name or a damaged config is one problem
            return f"cannot build open_clip {arch!r}: {err}"
        return whole_model_problem(expected, checkpoint, f"a whole open_clip {arch} checkpoint",
                                   "the whole open_clip CLIP file (.safetensors or .pt)")

    def text_encoder(self, arch: str, checkpoint: Path, device: str, batch_size: int):
        """open_clip's `encode_text` of the whole CLIP (built with no pretrained tag) and its SimpleTokenizer."""
        import numpy as np
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        from ...core.errors import I2PError
        from ..checkpoints import read_state_dict, strip_prefixes

        config = open_clip_config(arch)
        if config["text_cfg"].get("hf_tokenizer_name"):
            raise I2PError(f"{arch}: its tokenizer comes from the Hugging Face hub, which is not used here")
        # A normal build: CLIP's attention mask is a buffer only its constructor computes (never in a checkpoint).
        model = open_clip.model.CLIP(**{k: v for k, v in config.items() if k in CLIP_KEYS})
        try:
            model.load_state_dict(strip_prefixes(read_state_dict(Path(checkpoint))), strict=True)
        except RuntimeError as err:
            raise I2PError(f"{checkpoint} is not a full open_clip {arch} checkpoint: {err}") from err
        model = model.to(device).eval()
        tokenizer = SimpleTokenizer(context_length=config["text_cfg"].get("context_length", 77))
        autocast = device.startswith("cuda")

        def embed(texts: list[str]) -> np.ndarray:
            chunks = []
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
                for start in range(0, len(texts), batch_size):
                    tokens = tokenizer(texts[start:start + batch_size]).to(device)
                    chunks.append(nn.functional.normalize(model.encode_text(tokens).float(), dim=-1).cpu().numpy())
            return np.concatenate(chunks) if chunks else np.zeros((0, int(config["embed_dim"])), np.float32)

        return embed

    def propose(self, shapes: Shapes, head_in: int | None, source: Path, arch: str | None = None
                ) -> Iterator[Candidate]:
        """An open_clip ViT (`conv1`, `transformer.resblocks`) or timm-trunk tower (`trunk.`, `head.proj`), alone or
        in a whole CLIP file: the registered configs (and model-config .json files beside the file) whose vision
        side has its width, depth, patch and output width; a position grid of another size as native_resolution."""
        vit = key_prefix(shapes, "conv1.weight")
        trunk = key_prefix(shapes, "trunk.stem.0.weight")
        if vit is None and trunk is None:
            return
        prefix = vit if vit is not None else trunk
        visual = under_prefix(shapes, prefix)
        fits = []
        for order, (name, config) in enumerate(_configs(source, arch)):
            vision = config.get("vision_cfg", {})
            found = _vit_fit(visual, vision, int(config.get("embed_dim", 0))) if vit is not None \
                else _trunk_fit(visual, vision)
            if found is not None:  # a config beside the file first, then no native override, then the plainest name
                fits.append(((order >= 0 and name.endswith(".json")) is False, found[0] is not None, len(name),
                             name, config, found))
        for *_, name, config, (native, text) in sorted(fits, key=lambda f: f[:4]):
            vision = config.get("vision_cfg", {})
            entry = {"library": "open_clip", "arch": name, **({"native_resolution": native} if native else {})}
            size = native or _size(vision)
            preprocess, sources = _preprocess(config, source, name)
            image = {**preprocess, "resolutions": [size]}
            yield Candidate(entry, f"open_clip {text} ({name}), output {config.get('embed_dim')}, {size} px"
                            + (f", under `{prefix}`" if prefix else ""), image, (), sources)


COCA_GENERATE = {"max_new_tokens": (int,), "repetition_penalty": (int, float), "num_beams": (int,),
                 "length_penalty": (int, float)}


def _coca(config: Mapping, arch: str, options: Mapping) -> nn.Module:
    """A whole open_clip CoCa model (its keys open_clip's own), its forward giving greedy captions as UTF-8 bytes."""
    import types

    from open_clip.coca_model import CoCa

    if "multimodal_cfg" not in config:
        raise EntryFieldError(f"{arch} is not a CoCa model (no multimodal_cfg): only CoCa captions", "features")
    model = CoCa(**{k: v for k, v in config.items() if k in ("embed_dim", "multimodal_cfg", "text_cfg",
                                                              "vision_cfg", "quick_gelu")})
    model._i2p_generate = {"max_new_tokens": 30, "repetition_penalty": 1.0, "num_beams": 1, "length_penalty": 1.0,
                           **dict(options.get("generate") or {})}
    model.forward = types.MethodType(_coca_captions, model)
    return model


def _penalised(logits: torch.Tensor, text: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: the logits of tokens already in the text shrunk towards (or past) zero."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, text)
    return logits.scatter(1, text, torch.where(seen < 0, seen * penalty, seen / penalty))


def _coca_captions(self: nn.Module, images: torch.Tensor) -> Captions:
    """Captions decoded with CoCa's own text decoder from `<start_of_text>` to `<end_of_text>`: greedy, or beam
    search (`num_beams`, scores divided by length ** `length_penalty`), deterministic either way (open_clip 3.3's
    `generate` samples, or calls a transformers class 5.x removed). On the meta device only the image encoder runs,
    for its shapes."""
    from open_clip.tokenizer import SimpleTokenizer, decode

    options = self._i2p_generate
    steps = int(options["max_new_tokens"])
    _, embs = self._encode_image(images)
    if images.is_meta:
        return Captions([""] * len(images), images.device)
    tokenizer = SimpleTokenizer()
    sot, eot = tokenizer.encoder["<start_of_text>"], tokenizer.encoder["<end_of_text>"]
    beams = int(options["num_beams"])
    search = _greedy if beams == 1 else _beam_search
    rows = search(self, embs, sot, eot, steps, float(options["repetition_penalty"]), beams,
                  float(options["length_penalty"]))
    texts = [decode(row).split("<end_of_text>")[0].replace("<start_of_text>", "").strip() for row in rows]
    return as_captions(texts, images)


def _next_logits(model: nn.Module, embs: torch.Tensor, text: torch.Tensor, penalty: float) -> torch.Tensor:
    return _penalised(model.text_decoder(embs, model._encode_text(text)[1])[:, -1].float(), text, penalty)


def _greedy(model: nn.Module, embs: torch.Tensor, sot: int, eot: int, steps: int, penalty: float, *_: Any
            ) -> list[torch.Tensor]:
    """The most likely next token, every step, until each row's `<end_of_text>`."""
    text = torch.full((len(embs), 1), sot, dtype=torch.long, device=embs.device)
    done = torch.zeros(len(embs), dtype=torch.bool, device=embs.device)
    for _ in range(steps):
        token = torch.where(done, torch.full_like(done, eot, dtype=torch.long),
                            _next_logits(model, embs, text, penalty).argmax(dim=-1))
        text = torch.cat([text, token[:, None]], dim=1)
        done |= token == eot
        if bool(done.all()):
            break
    return list(text)


def _beam_search(model: nn.Module, embs: torch.Tensor, sot: int, eot: int, steps: int, penalty: float, beams: int,
                 length_penalty: float) -> list[torch.Tensor]:
    """Per image the `beams` best partial captions by summed log-probability; a caption ends at `<end_of_text>`
    and is kept by its score / length ** length_penalty; the best kept (or, with none, the best partial) wins."""
    count, device = len(embs), embs.device
    embs = embs.repeat_interleave(beams, dim=0)
    text = torch.full((count * beams, 1), sot, dtype=torch.long, device=device)
    scores = torch.full((count, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam to start: the others would repeat it
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(count)]
    for step in range(1, steps + 1):
        logp = torch.log_softmax(_next_logits(model, embs, text, penalty), dim=-1)
        total = (scores[:, :, None] + logp.view(count, beams, -1)).view(count, -1)
        best, index = total.topk(2 * beams, dim=1)
        vocab = logp.shape[-1]
        rows, new_scores = [], torch.full((count, beams), float("-inf"), device=device)
        for image in range(count):
            kept = 0
            for value, flat in zip(best[image].tolist(), index[image].tolist(), strict=True):
                beam, token = divmod(flat, vocab)
                source = text[image * beams + beam]
                if value == float("-inf"):
                    break
                if token == eot:
                    finished[image].append((value / (step ** length_penalty), torch.cat([source, source.new_tensor(
                        [eot])])))
                    continue
                rows.append(torch.cat([source, source.new_tensor([token])]))
                new_scores[image, kept] = value
                kept += 1
                if kept == beams:
                    break
            while kept < beams:  # fewer live candidates than beams: dead rows keep the shape
                rows.append(torch.cat([text[image * beams], text.new_tensor([eot])]))
                kept += 1
        text, scores = torch.stack(rows), new_scores
        if all(len(f) >= beams for f in finished):
            break
    out = []
    for image in range(count):
        if not finished[image]:  # none ended in time: the best partial caption, scored the same way
            beam = int(scores[image].argmax())
            finished[image].append((float(scores[image, beam]), text[image * beams + beam]))
        out.append(max(finished[image], key=lambda item: item[0])[1])
    return out


def _size(vision: Mapping) -> int:
    size = vision.get("image_size", 224)
    return int(size if isinstance(size, int) else size[0])


RESIZE_MODES = {"shortest": "shorter_side_center_crop", "squash": "squash"}  # open_clip's resize_mode: ours


def _preprocess(config: Mapping, source: Path, name: str) -> tuple[dict, dict]:
    """The image fields open_clip's eval transform uses for this model, with where each came from: the
    `preprocess_cfg` of an open_clip_config.json beside the file (the hub's layout) or of the model config, then
    open_clip's own defaults (OpenAI's mean/std, bicubic, shorter side + centre crop), which image_transform applies
    to any model that says nothing else."""
    beside = source.parent / "open_clip_config.json"
    try:
        hub = json.loads(beside.read_text(encoding="utf-8")).get("preprocess_cfg") if beside.is_file() else None
    except (OSError, ValueError, AttributeError):
        hub = None
    cfg, origin = (hub, beside.name) if isinstance(hub, Mapping) else (config.get("preprocess_cfg") or {},
                                                                        f"the preprocess_cfg of {Path(name).name}")
    defaults = "open_clip's defaults (its image_transform)"
    image = {**CLIP_IMAGE, "resize": "shorter_side_center_crop"}
    sources = {key: defaults for key in ("mean", "std", "interpolation", "resize")}
    for key in ("mean", "std"):
        if isinstance(cfg.get(key), (list, tuple)) and len(cfg[key]) == 3:
            image[key], sources[key] = [round(float(v), 4) for v in cfg[key]], origin
    if cfg.get("interpolation") in ("bicubic", "bilinear"):
        image["interpolation"], sources["interpolation"] = cfg["interpolation"], origin
    if cfg.get("resize_mode") in RESIZE_MODES:
        image["resize"], sources["resize"] = RESIZE_MODES[cfg["resize_mode"]], origin
    elif cfg.get("resize_mode"):  # `longest` pads to a square: not a view this package makes
        del image["resize"], sources["resize"]
    return image, sources


def _configs(source: Path, arch: str | None) -> Iterator[tuple[str, dict]]:
    """(arch, config): the one named, else model-config .json files beside the file, then every registered one."""
    import open_clip

    if arch is not None:
        try:
            yield arch, open_clip_config(arch)
        except ValueError:  # not an open_clip name (a timm arch given with --arch): another library's reading
            pass
        return
    for path in sorted(source.parent.glob("*.json")):
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and isinstance(config.get("vision_cfg"), dict):
            yield str(path), config
    for name in open_clip.list_models():
        yield name, open_clip.get_model_config(name)


def _vit_fit(visual: Shapes, vision: Mapping, embed_dim: int) -> tuple[int | None, str] | None:
    """(native size if not the config's, description) when an open_clip ViT config has the keys' shapes."""
    conv = visual.get("conv1.weight")
    layers = {int(m.group(1)) for k in visual if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    if conv is None or not layers or "timm_model_name" in vision:
        return None
    width, patch = conv[0], conv[-1]
    proj = visual.get("proj")
    if (vision.get("width"), vision.get("layers"), vision.get("patch_size")) != (width, max(layers) + 1, patch) or \
            (proj is not None and proj[-1] != embed_dim):
        return None
    tokens = visual.get("positional_embedding", (0,))[0]
    grid = int(round(max(tokens - 1, 0) ** 0.5))
    native = grid * patch
    return (None if native == _size(vision) else native), (f"ViT, width {width}, {max(layers) + 1} blocks, patch "
                                                            f"{patch}, grid {grid}")


def _trunk_fit(visual: Shapes, vision: Mapping) -> tuple[None, str] | None:
    """A timm-trunk config (ConvNeXt-XXL) whose trunk name has the stem's width; the deep check confirms the rest."""
    from .timm_models import CONVNEXT_WIDTHS

    name = vision.get("timm_model_name")
    width = visual["trunk.stem.0.weight"][0]
    if not isinstance(name, str) or not any(f"_{w}" in name for w in CONVNEXT_WIDTHS.get(width, ())):
        return None
    return None, f"timm trunk {name}, stem width {width}"


OPEN_CLIP = register_library(OpenClipLibrary())
