"""The caption kind: an image captioner whose text is embedded by all-MiniLM-L6-v2, the third path of this
competition (the 7th place's GIT, the 4th place's CoCa captions, the public BLIP notebooks).

The captioner is its library's (`library: transformers`, `features: caption`: BLIP, GIT, VisionEncoderDecoder;
decoding in its `backbone: {generate: ..., prompt: ...}` options), and hands its captions
on (`Captions`, a text per image); this kind's head embeds them with the MiniLM folder the entry names (checked by
sha256) and gives one record per view (`ViewOutput`): the embeddings, which rows have one, and the captions. An
empty caption is no prompt: its row has no value, so the run writes the fallback for it and lists it as "made no
caption for it", apart from any precision problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..core.fileio import sha256_file
from ..core.registry import LIBRARIES, register_kind
from ..core.validate import resolve_file
from ..manifest.fields import checked_fields, entry_dict, entry_field
from ..manifest.parse import ParseContext, parse_network
from ..manifest.schema import KindExample, NetworkSpec, OutputSpec, TowerKind, ViewOutput, sha256_problem
from ..models.backbones.base import Captions
from ..models.checkpoints import content_identity

TEXT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # a sentence-transformers folder's weights file
NO_CAPTION = "no caption"  # what a row without a caption lacks, in the run's list of fallbacks


@dataclass(frozen=True)
class CaptionOptions:
    """A caption tower's `caption:` section: the text model that embeds its captions."""

    text_model: Path = entry_field(path=True)  # a local sentence-transformers folder of all-MiniLM-L6-v2
    # of the folder's weights file (model.safetensors)
    text_model_sha256: str | None = entry_field(None, check=sha256_problem)

    @property
    def weights_file(self) -> Path:
        """The text model's weights file, which `text_model_sha256` checks and the cache key names."""
        return next((self.text_model / n for n in TEXT_WEIGHTS if (self.text_model / n).is_file()),
                    self.text_model / TEXT_WEIGHTS[0])

    def to_dict(self, out_dir: Path | None = None) -> dict:
        return entry_dict(self, out_dir)


@dataclass(frozen=True, kw_only=True)
class CaptionSpec(NetworkSpec):
    """A captioner whose captions, embedded by MiniLM, are the tower's output: no head of its own."""

    kind: ClassVar[str] = "caption"
    caption: CaptionOptions = entry_field(section=CaptionOptions)

    @property
    def head_name(self) -> str:
        return "caption -> all-MiniLM-L6-v2"

    def _describe_output(self) -> str:
        generate = dict((self.backbone or {}).get("generate") or {})
        return f"captions ({', '.join(f'{k} {v}' for k, v in generate.items()) or 'greedy'}) -> MiniLM"


class CaptionHead(torch.nn.Module):
    """Captions (a text per image) -> one record: their all-MiniLM-L6-v2 embeddings (B, 384), unit float32, the rows
    with a caption, and the captions; an empty caption's row has no value (NaN, not present: the run's fallback,
    listed). No parameters: the text model is held outside the tower's keys."""

    def __init__(self, options: CaptionOptions, embedding_dim: int):
        super().__init__()
        self.options, self.embedding_dim = options, embedding_dim

    def forward(self, captions: Captions) -> ViewOutput:
        if captions.device.type == "meta":
            return ViewOutput(torch.empty(len(captions), self.embedding_dim, device="meta"))
        from ..models.text import embed_prompts

        texts = list(captions)
        out = torch.full((len(texts), self.embedding_dim), float("nan"))
        kept = [i for i, text in enumerate(texts) if text]
        if kept:
            device = str(captions.device) if captions.device.type == "cuda" else None
            vectors = embed_prompts([texts[i] for i in kept], self.options.text_model, device=device)
            out[kept] = torch.from_numpy(vectors)
        present = torch.tensor([bool(text) for text in texts], dtype=torch.bool)
        return ViewOutput(out.to(captions.device), present.to(captions.device), texts)


class CaptionKind(TowerKind):
    """A captioner's text, embedded by all-MiniLM-L6-v2."""

    name = "caption"
    spec = CaptionSpec
    reported_keys = frozenset({"head"})
    backbone_features = "caption"
    example_library = "transformers"

    def output(self, spec: CaptionSpec, embedding_dim: int) -> OutputSpec:
        """The caption's embedding, and the caption itself; a row without a caption has no value."""
        return OutputSpec(embedding_dim, texts=True, missing=NO_CAPTION)

    def text_models(self, spec: CaptionSpec) -> list[Path]:
        return [spec.caption.text_model]

    def example(self, folder: Path, out_dim: int, embedding_dim: int) -> KindExample | None:
        """Its library's example captioner (its own arch: a caption tower's backbone must give captions) and the
        installed all-MiniLM-L6-v2 (None without it: captions cannot be embedded)."""
        from ..models.text import TextModelUnavailable, default_model_path

        try:
            text_model = default_model_path()
        except TextModelUnavailable:  # no MiniLM here: the kind cannot be shown
            return None
        arch = LIBRARIES.get(self.example_library).example(folder, features="caption")
        if arch is None:
            return None
        return KindExample({"kind": "caption", "arch": arch, "backbone": {"generate": {"max_new_tokens": 6}},
                            "caption": {"text_model": str(text_model)}})

    def parse(self, raw: Mapping, name: str, label: str, ctx: ParseContext) -> CaptionSpec | None:
        raw = {"features": "caption", **raw}  # a captioner's features are its captions
        if raw["features"] != "caption":
            ctx.problems.add(f"{label}.features", "a caption tower's backbone gives captions: leave features out")
        return parse_network(raw, name, label, ctx, self, self._parse_section)

    @staticmethod
    def _parse_section(raw: Mapping, label: str, ctx: ParseContext) -> dict:
        if "head" in raw:
            ctx.problems.add(f"{label}.head", "a caption tower has no head: its captions are embedded by MiniLM")
        section = raw.get("caption")
        where = f"{label}.caption"
        if not isinstance(section, Mapping):
            ctx.problems.add(where, "is required: {text_model: FOLDER} (a local sentence-transformers folder of "
                                    "all-MiniLM-L6-v2; on Kaggle an attached dataset)")
            return {"caption": None}
        values = checked_fields(CaptionOptions, section, where, ctx.problems, skip=("text_model",))
        folder = section.get("text_model")
        path = None
        if isinstance(folder, str) and ctx.check_files:
            found = resolve_file(f"{folder}/modules.json", ctx.base_dir, f"{where}.text_model", ctx.problems,
                                 "sentence-transformers folder (its modules.json)")
            path = found.parent if found else None
        elif isinstance(folder, str):
            path = Path(folder)
        else:
            ctx.problems.add(f"{where}.text_model", "is required: the all-MiniLM-L6-v2 folder")
        return {"caption": CaptionOptions(text_model=path, **values) if path else None}

    def build_head(self, spec: CaptionSpec, in_dim: int, embedding_dim: int) -> CaptionHead:
        return CaptionHead(spec.caption, embedding_dim)

    def deep_problems(self, spec: CaptionSpec, label: str) -> list[str]:
        """The text model's weights file against its sha256, before any weight loads."""
        options = spec.caption
        if not options.text_model_sha256:
            return []
        weights = options.weights_file
        if not weights.is_file():
            return [f"{label}.caption.text_model: {options.text_model} holds no {' or '.join(TEXT_WEIGHTS)}"]
        actual = sha256_file(weights)
        if actual.lower() != options.text_model_sha256.lower():
            return [f"{label}.caption.text_model_sha256: {weights} has sha256 {actual}, the manifest says "
                    f"{options.text_model_sha256}; the folder is not the all-MiniLM-L6-v2 the manifest means"]
        return []

    def cache_identity(self, spec: CaptionSpec, entry: dict) -> dict:
        """The captions' embedding depends on the text model: every file of its folder by content (sha256, memoised
        per file: other weights of the same size with the time set back are told apart)."""
        entry = {k: v for k, v in entry.items() if k != "caption"}
        return {**entry, "text_model": content_identity(spec.caption.text_model)}


CAPTION = register_kind(CaptionKind())
