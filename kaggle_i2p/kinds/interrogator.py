"""The interrogator kind: the CLIP-interrogator composition (the public notebook at 0.458, and the 4th place's
templates x the top phrases of each component bank). The tower's CLIP image embedding scores the phrases of each
bank (mediums, artists, flavors, movements, ...: `build-bank --keys clip`), templates join the top phrases of every
bank into candidate prompts, the CLIP text tower scores the candidates against the image, and the best candidate (or
the mean of the top ones) is embedded by all-MiniLM-L6-v2.

1. Forward passes give unit CLIP image embeddings (cached per image and view, as a retrieval tower's queries).
2. After encoding, `interrogate` runs once over every query of the run: per bank the `top` phrases by cosine; per
   template and rank r < `top`, the template filled with each bank's r-th phrase; each distinct candidate text
   through the CLIP text tower once; the candidates ranked by cosine to the image; the best (`pick: best`) or the
   `mean_of` best (`pick: mean`, the mean of their MiniLM vectors) as the tower's embedding.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch

from ..bank.folder import Bank, BankError
from ..core.registry import register_kind
from ..core.validate import Problems, expand_path, expanded_path, resolve_file
from ..manifest.fields import checked_fields, entry_dict, entry_field, written_fields
from ..manifest.parse import ParseContext, parse_network
from ..manifest.schema import DEFAULT_EMBEDDING_DIM, EncodingContext, KindExample, NetworkSpec, OutputSpec, TowerKind

PATH_KEYS = ("phrase_banks", "clip_checkpoint", "text_model")  # resolved by the kind's parser itself
Pick = Literal["best", "mean"]
PICKS: tuple[str, ...] = get_args(Pick)
CLIP_TEXT_BATCH = 256


@dataclass(frozen=True)
class InterrogatorOptions:
    """An interrogator tower's `interrogator:` section."""

    phrase_banks: Path = entry_field(path=True)  # a folder of banks, one per slot: medium/, artist/, flavor/, ...
    # e.g. "{medium} by {artist}, {flavor}": slots are the banks' folder names
    templates: tuple[str, ...] = entry_field(hint="texts with {slot} fields, e.g. ['{medium} by {artist}, {flavor}']")
    # the CLIP model of the text tower: an open_clip name or model-config .json, or an HF model folder
    clip_arch: str = entry_field(required="the CLIP model of the text tower the phrase banks were built with (an "
                                          "open_clip name or config .json, or a transformers CLIP/SigLIP folder)")
    clip_checkpoint: Path = entry_field(path=True)  # its whole CLIP checkpoint, as build-bank --keys clip read it
    text_model: Path = entry_field(path=True)  # the all-MiniLM-L6-v2 folder
    top: int = entry_field(8, sparse=True, bounds=(1, None))  # phrases per bank, and candidates per template
    pick: Pick = entry_field("best", sparse=True)
    mean_of: int = entry_field(4, sparse=True, bounds=(1, None))  # pick: mean averages this many best candidates
    # a caption tower of the manifest whose caption fills {base} (the CLIP interrogator's)
    base: str | None = entry_field(None, hint="the name of a caption tower of this manifest")
    key_dim: int = entry_field(0, written=False)  # the banks' CLIP width, read from them

    @property
    def slots(self) -> tuple[str, ...]:
        """The bank names the templates use, in first-use order."""
        found: dict[str, None] = {}
        for template in self.templates:
            for _, name, _, _ in string.Formatter().parse(template):
                if name and name != "base":
                    found.setdefault(name)
        return tuple(found)

    def to_dict(self, out_dir: Path | None = None) -> dict:
        return entry_dict(self, out_dir)


# the section's keys checked from their marks (the paths and the banks' width are the parser's own)
OWN_KEYS = [m["key"] for f, m in written_fields(InterrogatorOptions) if f.name not in PATH_KEYS]


def _template_ok(template: str, where: str, problems: Problems) -> bool:
    """Whether a template can be filled; its problem added when not."""
    if (problem := template_problem(template)) is not None:
        problems.add(where, f"{template!r}: {problem}")
    return problem is None


@dataclass(frozen=True, kw_only=True)
class InterrogatorSpec(NetworkSpec):
    """A CLIP image tower whose embedding composes a prompt from phrase banks: no head of its own."""

    kind: ClassVar[str] = "interrogator"
    interrogator: InterrogatorOptions = entry_field(section=InterrogatorOptions)

    @property
    def head_name(self) -> str:
        return "interrogator (no parameters)"

    def _describe_output(self) -> str:
        options = self.interrogator
        return (f"interrogator over {', '.join(options.slots)} ({len(options.templates)} templates x top "
                f"{options.top}, pick {options.pick})")


class QueryHead(torch.nn.Module):
    """The unit CLIP image embedding: the interrogation runs once per run, after every image is encoded."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(features.float(), dim=-1)


def template_problem(template: str) -> str | None:
    """Why a template cannot be filled (a stray or unclosed brace, an empty `{}`, a field with a format spec or
    attribute, no slot at all); None when it names one or more bank slots (or {base}) and nothing else."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as err:
        return f"{err} (a brace without its pair: write {{{{ and }}}} for a literal brace)"
    if not fields:
        return "names no slot: a template joins bank phrases, e.g. '{medium} by {artist}'"
    for name, spec, conversion in fields:
        if not name:
            return "has an empty field {}: name the bank it takes a phrase from, e.g. {medium}"
        if spec or conversion or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
            return f"field {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} is not " \
                   "a bank's folder name alone"
    return None


def candidates(options: InterrogatorOptions, phrases: Mapping[str, list[str]], base: str = "") -> list[str]:
    """One query's candidate prompts: each template at each rank r filled with every bank's r-th phrase (and the
    base caption), in order, each distinct text once."""
    out: dict[str, None] = {}
    for rank in range(options.top):
        for template in options.templates:
            filled = template.format(base=base, **{slot: phrases[slot][min(rank, len(phrases[slot]) - 1)]
                                                   for slot in options.slots})
            out.setdefault(re.sub(r"\s+", " ", filled).strip(" ,"))
    return list(out)


def _is_folder(raw: str, base_dir: Path) -> bool:
    """Whether a `clip_arch` names an existing folder (a transformers model's), relative to the manifest."""
    try:
        return expand_path(raw, base_dir).is_dir()
    except KeyError:  # an unset variable: not a folder here
        return False


def interrogate(options: InterrogatorOptions, queries: np.ndarray, device: str | torch.device = "cpu",
                base: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Every query of the run (unit CLIP image embeddings), with each one's base caption -> (unit MiniLM
    embeddings, the picked prompts)."""
    from ..bank.build import clip_embedder
    from ..models.text import embed_prompts

    device = str(device)
    queries = np.asarray(queries, dtype=np.float32)
    top_phrases: dict[str, list[list[str]]] = {}
    for slot in options.slots:
        bank = Bank.open(options.phrase_banks / slot)
        keys = np.asarray(bank.keys, dtype=np.float32)
        scores = queries @ keys.T
        k = min(options.top, len(keys))
        rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        texts = dict(zip(np.unique(rows).tolist(), bank.texts(np.unique(rows).tolist()), strict=True))
        top_phrases[slot] = [[texts[int(r)] for r in row] for row in rows]
    per_query = [candidates(options, {slot: top_phrases[slot][i] for slot in options.slots},
                            base[i] if base else "") for i in range(len(queries))]
    distinct = sorted({text for texts in per_query for text in texts})
    clip = clip_embedder(options.clip_arch, options.clip_checkpoint, device, CLIP_TEXT_BATCH)
    text_keys = dict(zip(distinct, clip(distinct), strict=True)) if distinct else {}
    chosen: list[list[str]] = []
    for query, texts in zip(queries, per_query, strict=True):
        scores = np.array([float(text_keys[t] @ query) for t in texts])
        order = np.argsort(-scores, kind="stable")
        chosen.append([texts[i] for i in order[:1 if options.pick == "best" else options.mean_of]])
    picked = sorted({t for texts in chosen for t in texts})
    vectors = dict(zip(picked, embed_prompts(picked, options.text_model,
                                             device=device if device.startswith("cuda") else None), strict=True))
    out = np.stack([np.mean([vectors[t] for t in texts], axis=0) for texts in chosen]) if chosen else \
        np.zeros((0, DEFAULT_EMBEDDING_DIM), np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True) if len(out) else 1
    return out.astype(np.float32), [texts[0] for texts in chosen]


class InterrogatorKind(TowerKind):
    """A CLIP image embedding composing a prompt from phrase banks, embedded by MiniLM."""

    name = "interrogator"
    spec = InterrogatorSpec
    reported_keys = frozenset({"head"})
    example_library = "open_clip"

    def parse(self, raw: Mapping, name: str, label: str, ctx: ParseContext) -> InterrogatorSpec | None:
        return parse_network(raw, name, label, ctx, self, self._parse_section)

    def example(self, folder: Path, out_dim: int, embedding_dim: int) -> KindExample | None:
        """A tiny open_clip CLIP's image tower composing from three phrase banks (None without MiniLM)."""
        from ..models.text import TextModelUnavailable

        try:
            entry = write_example(folder)
        except TextModelUnavailable:
            return None
        del entry["checkpoint"]  # the image tower's weights are the example tower's own; the whole CLIP scores texts
        return KindExample(entry)

    def output(self, spec: InterrogatorSpec, embedding_dim: int) -> OutputSpec:
        """The unit CLIP image embedding, in the phrase banks' key width."""
        return OutputSpec(spec.interrogator.key_dim)

    @staticmethod
    def _parse_section(raw: Mapping, label: str, ctx: ParseContext) -> dict:
        problems, where = ctx.problems, f"{label}.interrogator"
        if "head" in raw:
            problems.add(f"{label}.head", "an interrogator has no head: its image embedding picks phrases")
        section = raw.get("interrogator")
        if not isinstance(section, Mapping):
            problems.add(where, "is required: {phrase_banks, templates, clip_arch, clip_checkpoint, text_model}")
            return {"interrogator": None}
        values = checked_fields(InterrogatorOptions, section, where, problems, skip=PATH_KEYS)
        templates = [t for number, t in enumerate(values.get("templates", ()))
                     if _template_ok(t, f"{where}.templates[{number}]", problems)]
        if templates and not any(name and name != "base" for t in templates
                                 for _, name, _, _ in string.Formatter().parse(t)):
            problems.add(f"{where}.templates", "name no bank slot (only {base}): at least one template needs a "
                                               "phrase bank's slot, e.g. '{base}, {flavor}'")
        if values.get("base") is None and any("{base}" in t for t in templates):
            problems.add(f"{where}.templates", "{base} needs base: the caption tower whose caption fills it")
        clip_arch = values.get("clip_arch", "")
        if clip_arch.endswith(".json") or (clip_arch and _is_folder(clip_arch, ctx.base_dir)):  # an HF folder
            values["clip_arch"] = str(expanded_path(clip_arch, ctx.base_dir, f"{where}.clip_arch", problems)
                                      or clip_arch)
        paths: dict[str, Path | None] = {}
        for key, what in (("clip_checkpoint", "whole CLIP checkpoint (open_clip's file, or the HF model's weights)"),
                          ("text_model", "all-MiniLM-L6-v2 folder (its modules.json)")):
            value = section.get(key)
            target = f"{value}/modules.json" if key == "text_model" and isinstance(value, str) else value
            found = resolve_file(target, ctx.base_dir, f"{where}.{key}", problems, what) if ctx.check_files \
                else (expanded_path(value, ctx.base_dir, f"{where}.{key}", problems, check_files=False)
                      if isinstance(value, str) else None)
            paths[key] = (found.parent if key == "text_model" and ctx.check_files and found else found)
        folder, key_dim = _parse_banks(section.get("phrase_banks"), templates, where, ctx)
        if None in paths.values() or folder is None or not templates or len(values) < len(OWN_KEYS):
            return {"interrogator": None}
        return {"interrogator": InterrogatorOptions(**{**values, "templates": tuple(templates)}, phrase_banks=folder,
                                                    key_dim=key_dim, **paths)}

    def backbone_outputs(self, spec: InterrogatorSpec) -> int:
        return 0

    def deep_problems(self, spec: InterrogatorSpec, label: str) -> list[str]:
        """The CLIP text tower's checkpoint against its arch (keys and shapes), before any image is read."""
        from ..bank.build import clip_checkpoint_problem

        options = spec.interrogator
        problem = clip_checkpoint_problem(options.clip_arch, options.clip_checkpoint)
        return [f"{label}.interrogator.clip_checkpoint: {problem}"] if problem else []

    def build_head(self, spec: InterrogatorSpec, in_dim: int, embedding_dim: int) -> QueryHead:
        if in_dim != spec.interrogator.key_dim:
            from ..core.errors import EntryFieldError

            raise EntryFieldError(f"the image tower gives {in_dim}-d embeddings and the phrase banks' CLIP keys are "
                                  f"{spec.interrogator.key_dim}-d: use the CLIP the banks were built with",
                                  "interrogator.phrase_banks")
        return QueryHead()

    def cache_identity(self, spec: InterrogatorSpec, entry: dict) -> dict:
        """The queries are the image tower's alone: the banks, templates and text towers are applied after."""
        return {**{k: v for k, v in entry.items() if k != "interrogator"}, "key_dim": spec.interrogator.key_dim}

    def has_step_after_encoding(self, spec: InterrogatorSpec) -> bool:
        return True

    def text_models(self, spec: InterrogatorSpec) -> list[Path]:
        return [spec.interrogator.text_model]

    def text_source(self, spec: InterrogatorSpec) -> str | None:
        return spec.interrogator.base

    def after_encoding(self, spec: InterrogatorSpec, outputs: np.ndarray, context: EncodingContext) -> np.ndarray:
        return interrogate(spec.interrogator, outputs, context.device, context.texts)[0]


def _parse_banks(raw: Any, templates: list, where: str, ctx: ParseContext) -> tuple[Path | None, int]:
    """The phrase-bank folder: one bank with CLIP keys per slot the templates name, all of one key width."""
    problems = ctx.problems
    if not isinstance(raw, str):
        problems.add(f"{where}.phrase_banks", "is required: a folder holding one bank per slot (medium/, artist/, "
                                              "...), each from `kaggle-i2p build-bank --keys clip`")
        return None, 0
    folder = expanded_path(raw, ctx.base_dir, f"{where}.phrase_banks", problems)
    if folder is None:
        return None, 0
    slots = InterrogatorOptions(folder, tuple(templates), "", folder, folder).slots if templates else ()
    widths = set()
    for slot in slots:
        try:
            bank = Bank.open(folder / slot)
        except BankError as err:
            problems.add(f"{where}.templates", f"slot {{{slot}}} needs the bank {folder / slot}: {err}")
            continue
        if bank.keys is None:
            problems.add(f"{where}.phrase_banks", f"{folder / slot} has no keys: build it with --keys clip")
            continue
        widths.add(int(bank.keys.shape[1]))
    if len(widths) > 1:
        problems.add(f"{where}.phrase_banks", f"the banks' keys have widths {sorted(widths)}: build them all with "
                                              "one CLIP")
    return folder, (widths.pop() if len(widths) == 1 else 0)


EXAMPLE_PHRASES = {"medium": ["an oil painting", "a photograph", "a watercolor", "a 3d render", "a sketch"],
                   "artist": ["greg rutkowski", "alphonse mucha", "studio ghibli", "monet", "artgerm"],
                   "flavor": ["trending on artstation", "highly detailed", "cinematic lighting", "4k", "dramatic"]}


def write_example(folder: str | Path, seed: int = 0) -> dict:
    """A tiny whole open_clip CLIP file (the open_clip library's example config: its visual tower is the image
    tower, its text tower scores candidates), phrase banks built from it by build-bank (keys clip), and the
    installed all-MiniLM-L6-v2: an interrogator's entry keys (its `checkpoint` the whole CLIP file)."""
    import json

    import open_clip
    from safetensors.torch import save_file

    from ..bank.build import build_bank
    from ..core.registry import LIBRARIES
    from ..models.text import default_model_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = LIBRARIES.get("open_clip").example(folder)
    config = json.loads((folder / arch).read_text())
    torch.manual_seed(seed)
    clip = open_clip.model.CLIP(**{k: v for k, v in config.items() if k != "quick_gelu"})
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "tiny_clip.safetensors"))
    for slot, phrases in EXAMPLE_PHRASES.items():
        (folder / f"{slot}.txt").write_text("\n".join(phrases) + "\n", encoding="utf-8")
        build_bank(folder / f"{slot}.txt", folder / "phrases" / slot, keys="clip", clip_arch=str(folder / arch),
                   clip_checkpoint=folder / "tiny_clip.safetensors", device="cpu", dtype="float32")
    return {"kind": "interrogator", "library": "open_clip", "arch": arch, "checkpoint": "tiny_clip.safetensors",
            "interrogator": {"phrase_banks": "phrases", "templates": ["{medium} by {artist}, {flavor}",
                                                                      "{medium}, {flavor}"],
                             "clip_arch": arch, "clip_checkpoint": "tiny_clip.safetensors",
                             "text_model": str(default_model_path()), "top": 3}}


INTERROGATOR = register_kind(InterrogatorKind())
