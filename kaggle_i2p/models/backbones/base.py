"""What generic code asks a model library, as one class: a library is a subclass, registered in
`kaggle_i2p.core.registry.LIBRARIES` (timm's `register_model` and `pretrained_cfg`, open_clip's adapters).

A library builds its backbones offline (random weights: timm `pretrained=False`, open_clip with no pretrained tag)
and answers every library-specific question the towers, the trainer, the cache and the manifest have: the position
grid and how to resample it, the patch size, the layer of a parameter for layer-wise LR decay, which checkpoint
layouts it knows and which classifier to drop, and whether an `arch` names a file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from ...core.errors import I2PError

if TYPE_CHECKING:
    import torch
    from torch import nn

PosEmbedForSize = Callable[["nn.Module", int, int], dict[str, "torch.Tensor"]]


class TextTowerError(I2PError, ValueError):
    """No registered library reads a text tower from what was given."""


class Backbone(NamedTuple):
    """A built backbone: the module, the width of what it outputs, and for fixed-grid ViTs (open_clip) the function
    that resamples its position embeddings for another input size, the size they are laid out for, and the names
    of the parameters it reads (a resampled copy is kept while they are unchanged)."""

    module: nn.Module
    out_dim: int
    pos_embed_for_size: PosEmbedForSize | None = None
    native_size: int | None = None
    pos_params: tuple[str, ...] = ()


Shapes = Mapping[str, tuple[int, ...]]  # a checkpoint's keys and shapes, as `inspect` reads them (no weights)


class Candidate(NamedTuple):
    """A reading of a checkpoint a library proposes (`BackboneLibrary.propose`): the entry's backbone fields, what
    the family is, its usual preprocessing, and notes on what the keys cannot tell. `inspect` keeps the first whose
    whole entry the file fits."""

    entry: dict  # library, arch, and any of native_resolution, features, backbone
    family: str  # e.g. "timm ViT vit_base_patch16_224, width 768, 12 blocks, patch 16, grid 14x14"
    image: dict  # mean, std, interpolation, resolutions; resize and crop_pct where something says them
    notes: tuple[str, ...] = ()
    sources: dict = {}  # image field -> where its value came from (a config beside the file, the arch's own);
    # a field without one is the family's usual, which the user confirms


class Captions(list):
    """What a captioner backbone hands its head: its text per image, in order, and the device its images were on
    (where the head's values go; the meta device in the architecture check, where no text is made)."""

    def __init__(self, texts: list[str], device: torch.device | str):
        import torch

        super().__init__(texts)
        self.device = torch.device(device)


def as_captions(texts: list[str], images: torch.Tensor) -> Captions:
    """A captioner's decoded texts (stripped) as its backbone's output, for the images it read."""
    return Captions([text.strip() for text in texts], images.device)


def key_prefix(shapes: Shapes, suffix: str) -> str | None:
    """The shortest prefix under which the file has `suffix` (`model.backbone.` for a nested stem), or None."""
    found = [k[: -len(suffix)] for k in shapes if k == suffix or k.endswith(f".{suffix}")]
    return min(found, key=len) if found else None


def under_prefix(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    """The file's keys under `prefix`, the prefix removed."""
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


# Layer-wise LR decay: the block a parameter sits in, by the names the libraries' models give their blocks.
CONVNEXT_BLOCKS = (re.compile(r"\.stages\.(\d+)\.blocks\.(\d+)\."),  # ConvNeXt blocks
                   re.compile(r"\.stages\.(\d+)\.(downsample)\."))  # its downsampling, before the stage's 1st block
TRANSFORMER_BLOCKS = (re.compile(r"\.(?:blocks|resblocks)\.(\d+)\."),)  # ViT / EVA / open_clip transformer blocks


class BackboneLibrary:
    """One model library. Subclasses set `name` and implement `build`; the rest has defaults that fit a library
    whose backbones take any input size and keep no position grid."""

    name: ClassVar[str]
    arch_example: ClassVar[str] = ""  # for messages: a model name users of this library would write
    arch_file_suffixes: ClassVar[tuple[str, ...]] = ()  # an `arch` ending so is a model-config file (it travels)
    arch_folder_file: ClassVar[str | None] = None  # an `arch` naming a folder means this file in it (config.json)
    # The blocks layer-wise LR decay counts, from the input up (an optional answer: a serve-only library leaves it
    # empty, and a run that asks for decay trains its backbone at one learning rate, with a warning)
    block_patterns: ClassVar[tuple[re.Pattern, ...]] = ()
    embedding_names: ClassVar[tuple[str, ...]] = ()  # parameter names of layer 0 (stem, patch and position embeddings)
    no_weight_decay_names: ClassVar[tuple[str, ...]] = ()  # tokens and position embeddings AdamW leaves alone
    classifier_prefixes: ClassVar[tuple[str, ...]] = ()  # an ImageNet classifier's keys, dropped from initial weights
    # What the backbone may hand the head (`features:` in an entry); the first is what it gives when not told.
    feature_choices: ClassVar[tuple[str, ...]] = ()
    option_keys: ClassVar[dict[str, str]] = {}  # the entry's `backbone:` options this library takes, with a hint each
    holds_weights: ClassVar[bool] = False  # the `arch` file holds the backbone's weights (an exported program)

    def example(self, folder: Path, features: str | None = None) -> str | None:
        """The library's smallest model, written into `folder` as its users' files hold it (random weights), giving
        `features` (one of `feature_choices`; None: its default): the `arch` an entry names (a file in `folder`, or
        a model name the library builds); None: it has none. It is how the library proves itself: `kaggle-i2p
        selfcheck` serves it through the reference kind on the bundled sample images (does this environment, Kaggle's
        image say, serve the library?), and the registry tests take it through every step."""
        return None

    def build(self, arch: str, native_resolution: int | None, classes: int, **choices: Any) -> Backbone:
        """The backbone with random weights: `classes` outputs, or (0) its pooled features; nothing downloaded.
        `choices` holds the entry's `features` and `options` (its `backbone:` section) when it sets them; a library
        that declares none is called without them."""
        raise NotImplementedError

    def build_for(self, arch: str, native_resolution: int | None, classes: int, features: str | None = None,
                  options: Mapping[str, Any] | None = None) -> Backbone:
        """`build`, passing `features` and `options` only when the entry sets them (a plugin written before they
        existed takes three arguments)."""
        choices = {k: v for k, v in (("features", features), ("options", options)) if v}
        return self.build(arch, native_resolution, classes, **choices)

    def option_problems(self, features: str | None, options: Mapping[str, Any] | None) -> list[tuple[str, str]]:
        """(field, problem) for an entry's `features` and `backbone:` options this library does not take, checked
        when the manifest is read (what only a build can tell is reported by the architecture check)."""
        problems = []
        if features is not None and features not in self.feature_choices:
            known = ", ".join(self.feature_choices) or "none: leave `features` out"
            problems.append(("features", f"{features!r} is not what a {self.name} backbone gives; choices: {known}"))
        for key in sorted(set(options or {}) - set(self.option_keys)):
            known = "; ".join(f"{k} ({hint})" for k, hint in self.option_keys.items()) or "none"
            problems.append((f"backbone.{key}", f"is not a {self.name} backbone option; options: {known}"))
        return problems

    # --- the manifest's questions
    def arch_is_path(self, arch: str) -> bool:
        """Whether `arch` names a model-config file (resolved, rebased and copied with the manifest)."""
        return bool(self.arch_file_suffixes) and arch.endswith(self.arch_file_suffixes)

    def arch_files(self, arch: str, resolutions: Sequence[int]) -> tuple[str, ...]:
        """The files an `arch` path names for a tower run at `resolutions` (one, unless a library reads one file per
        resolution, as `library: export` with `{resolution}` in its name)."""
        return (arch,)

    def arch_identity(self, arch: str) -> Any:
        """What the cache hashes for `arch`: the name, or a config file's content (its path may move)."""
        if self.arch_is_path(arch):
            import json

            return json.loads(Path(arch).read_text(encoding="utf-8"))
        return arch

    # --- inspect's question
    def propose(self, shapes: Shapes, head_in: int | None, source: Path, arch: str | None = None
                ) -> Iterator[Candidate]:
        """Readings of a checkpoint's `shapes` as this library's backbone, most likely first (none: not one of its
        families). `head_in` is the width the file's head takes (None: no head found); `source` the file, for
        configs saved beside it; `arch`, when the user names it, the only architecture to consider."""
        return iter(())

    def is_program_file(self, path: Path) -> bool:
        """Whether `path` is a program this library serves as its `arch` (the file is the model: code and weights)
        rather than a checkpoint of weights; a library that reads no programs says no."""
        return False

    def saved_preprocessing(self, saved: Any, name: str) -> tuple[dict, dict]:
        """What a training file of this library's trainer says of its own eval preprocessing (`saved`: the file's
        unpickled top level, e.g. timm's train.py keeps its argparse Namespace under `args`), as image fields and
        where each came from; nothing by default."""
        return {}, {}

    # --- the towers' questions
    def patch_size(self, backbone: nn.Module) -> int | None:
        """The patch size of a ViT-style backbone (input sizes must be multiples of it), else None."""
        return None

    def position_grid(self, backbone: nn.Module) -> tuple[int, int] | None:
        """The patch grid the backbone's absolute position embeddings are laid out for; None: no such tie (a
        convnet runs at any size as it is)."""
        return None

    def native_size(self, backbone: nn.Module) -> int | None:
        """The input size the position embeddings are laid out for (ViTs), else None."""
        grid, patch = self.position_grid(backbone), self.patch_size(backbone)
        return None if grid is None or patch is None else int(grid[0]) * patch

    def resample_position_embeddings(self, state: Mapping[str, torch.Tensor], backbone: nn.Module
                                     ) -> dict[str, torch.Tensor]:
        """`state` (backbone keys) with position embeddings of another grid resampled to `backbone`'s, by the
        library's own function; other tensors as given."""
        return dict(state)

    # --- the text side (optional): a CLIP-style text tower, for banks' keys, the interrogator and the text map
    text_side: ClassVar[bool] = False  # whether this library answers the four questions below

    def reads_text_arch(self, arch: str) -> bool:
        """Whether `arch` names one of this library's models with a text tower (each library is asked in turn)."""
        return False

    def text_width(self, arch: str) -> int:
        """The width of `arch`'s text embeddings, from its config alone."""
        raise TextTowerError(f"the {self.name} library has no text tower")

    def text_problem(self, arch: str, checkpoint: Path) -> str | None:
        """Why `checkpoint` cannot be `arch`'s whole model, text tower included (its keys and shapes; no weights
        read); None when it fits."""
        return f"the {self.name} library has no text tower"

    def text_encoder(self, arch: str, checkpoint: Path, device: str, batch_size: int
                     ) -> Callable[[list[str]], Any]:
        """Texts -> unit text embeddings (a float32 array, a row per text) of `arch`'s text tower with
        `checkpoint`'s weights, `batch_size` texts at a time."""
        raise TextTowerError(f"the {self.name} library has no text tower")

    # --- the trainer's questions
    def block_of(self, name: str) -> tuple[int, int] | None:
        """The (stage, block) a backbone parameter sits in, ordered from the input up; None outside the blocks (and
        always for a library with no `block_patterns`: it answers no layer-wise LR decay)."""
        dotted = f".{name}"
        for pattern in self.block_patterns:
            match = pattern.search(dotted)
            if match:
                groups = match.groups()
                if len(groups) == 1:
                    return 0, int(groups[0])
                return int(groups[0]), -1 if groups[1] == "downsample" else int(groups[1])
        return None

    def is_embedding(self, name: str) -> bool:
        """Whether a backbone parameter belongs to layer 0 (the input side, before every block)."""
        return any(part in name for part in self.embedding_names)

    def skips_weight_decay(self, name: str) -> bool:
        """Whether AdamW leaves this backbone parameter undecayed besides 1-D tensors (tokens, positions)."""
        return any(part in name for part in self.no_weight_decay_names)

    # --- initial weights for training
    def unwrap_checkpoint(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """A pretrained file in one of the layouts this library writes, as backbone keys; notes on what was done."""
        return state, []

    def layouts_for(self, arch: str) -> Callable[[dict[str, torch.Tensor], set[str]],
                                                 Iterator[tuple[dict[str, torch.Tensor], str]]]:
        """`checkpoint_layouts` for one architecture (a library whose readings depend on the model, as transformers'
        own key renamings do, binds it here)."""
        return self.checkpoint_layouts

    def checkpoint_layouts(self, state: dict[str, torch.Tensor], backbone_keys: set[str]
                           ) -> Iterator[tuple[dict[str, torch.Tensor], str]]:
        """Candidate readings of a serving checkpoint as backbone keys, in the layouts this library's own code
        writes (a whole multimodal model, of which the tower uses the image side), each with a note; the tower's
        loader keeps the first that fills every key exactly."""
        inner, notes = self.unwrap_checkpoint(state)
        if notes:
            yield inner, "; ".join(notes)
