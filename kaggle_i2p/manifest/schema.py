"""What a manifest holds: the spec classes every tower kind builds on, their field marks, the validated `Manifest`,
and `TowerKind`, the questions generic code asks a kind (its module in `kaggle_i2p.kinds` answers them).

A tower is one of the registered kinds (`kaggle_i2p.core.registry.KINDS`): the package's own are `regressor` (an
image model with a head regressing the prompt embedding), `retrieval` (an image model whose scores select texts of a
bank) and `prior` (a constant vector, no views).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, get_args

import numpy as np

from ..core.errors import I2PError
from ..core.registry import KINDS, LIBRARIES
from ..core.validate import Problems, is_number
from .fields import entry_dict, entry_field, path_text

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from torch import nn


Interpolation = Literal["bicubic", "bilinear", "nearest", "area"]  # area: OpenCV's INTER_AREA
ResizeMode = Literal["squash", "shorter_side_center_crop"]
TrainPrecision = Literal["auto", "fp32", "fp16", "bf16"]  # autocast dtypes (training keeps fp32 weights)
Precision = Literal[TrainPrecision, "fp16-weights"]  # inference may also hold the weights in fp16

INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
PRECISIONS: tuple[str, ...] = get_args(Precision)  # the one list: manifest and CLI --precision
TRAIN_PRECISIONS: tuple[str, ...] = get_args(TrainPrecision)  # the training config's
# .ckpt: Lightning's; .pth.tar: timm's train.py; .index.json: a sharded checkpoint's index (its shards beside it)
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pth.tar", ".tar", ".index.json")

TOP_KEYS = {"embedding_dim", "fallback", "towers"}
DEFAULT_KIND = "regressor"  # an entry without `kind:`
LEADING_KEYS = ("name", "library", "kind", "arch", "checkpoint", "sha256")  # written first, as people write them
DEFAULT_EMBEDDING_DIM = 384  # all-MiniLM-L6-v2
MIN_RESOLUTION, MAX_RESOLUTION = 32, 1024


class ManifestError(I2PError, ValueError):
    """A manifest that cannot be used; the message lists every problem found, one per line."""

    def __init__(self, path: str | Path, problems: list[str], clean_towers: list | None = None,
                 embedding_dim: int = DEFAULT_EMBEDDING_DIM):
        self.path = str(path)
        self.problems = problems
        self.clean_towers: list[tuple[int, TowerSpec]] = clean_towers or []  # parsed without a problem of their own
        self.embedding_dim = embedding_dim
        super().__init__(f"{self.path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


Triplet = tuple[float, float, float]
NEVER_GUESSED = "preprocessing is never guessed; copy it from the training config of this checkpoint"
TRIPLET_HINT = "per RGB channel, on the 0-1 scale, e.g. [0.48145466, 0.4578275, 0.40821073] for OpenAI CLIP"
CROP_HINT = ("the eval crop's share of the resized image: timm's crop_pct, e.g. 0.875; an HF processor's crop_size / "
             "size, e.g. 224 / 256")


@dataclass(frozen=True)
class Normalisation:
    """One of an image section's `norms:` (the mean and std of one normalisation), marked as the section's own."""

    mean: Triplet = entry_field(required=NEVER_GUESSED, hint=TRIPLET_HINT)
    std: Triplet = entry_field(required=NEVER_GUESSED, hint=TRIPLET_HINT, low_open=True)


class View(NamedTuple):
    """One TTA view of a tower: its name (r336, r336_flip, r336_n2 for the second normalisation), input resolution,
    whether it is mirrored, and which of the tower's normalisations it uses."""

    name: str
    resolution: int
    flip: bool
    norm: int = 0  # index into ImageSpec.normalisations


def view_name(resolution: int, flip: bool, norm: int = 0) -> str:
    """r336, r336_flip; views of the second and later normalisations r336_n2, r336_n2_flip."""
    return f"r{resolution}{f'_n{norm + 1}' if norm else ''}{'_flip' if flip else ''}"


@dataclass(frozen=True)
class ImageSpec:
    """How a decoded uint8 image becomes this tower's input: resize, normalise, TTA resolutions and flip. The views
    are keyed one by one in the cache, so they are not part of the tower's identity.

    `norms` (the 4th place's TTA: every image under two mean/std pairs, averaged) lists every normalisation, each a
    view of its own on the same weights; then `mean`/`std` are the first's, and the entry writes `norms` alone."""

    mean: Triplet = entry_field(required=NEVER_GUESSED, hint=TRIPLET_HINT)
    std: Triplet = entry_field(required=NEVER_GUESSED, hint=TRIPLET_HINT, low_open=True)
    interpolation: Interpolation = entry_field(required=NEVER_GUESSED)
    resize: ResizeMode = entry_field(required=NEVER_GUESSED)
    resolutions: tuple[int, ...] = entry_field(identity=False, required=NEVER_GUESSED, lone=True, bounds=(
        MIN_RESOLUTION, MAX_RESOLUTION), hint="image sizes in pixels, e.g. [336, 448]")
    hflip: bool = entry_field(False, identity=False)
    view_weights: dict[str, float] | None = entry_field(None, identity=False)  # by view name; None = equal
    norms: tuple[tuple[Triplet, Triplet], ...] | None = entry_field(None)  # (mean, std) of each normalisation
    # the eval transform's crop (timm's crop_pct; an HF processor's crop_size / size): resize to floor(r / crop_pct)
    # (the shorter side, or both sides with `squash`), then the centre r x r; None: resize straight to r
    crop_pct: float | None = entry_field(None, sparse=True, bounds=(0.1, 1.0), hint=CROP_HINT)

    @property
    def normalisations(self) -> tuple[tuple[Triplet, Triplet], ...]:
        """(mean, std) of each normalisation, in view order: `norms`, or the entry's one mean/std."""
        return self.norms or ((self.mean, self.std),)

    @property
    def views(self) -> tuple[View, ...]:
        """Every TTA view, in order: each resolution, under each normalisation, then its mirror when `hflip`."""
        return tuple(View(view_name(r, flip, k), r, flip, k) for r in self.resolutions
                     for k in range(len(self.normalisations))
                     for flip in ((False, True) if self.hflip else (False,)))

    @property
    def n_views(self) -> int:
        return len(self.views)

    def view_weight_list(self) -> list[float]:
        """One weight per view, in `views` order (equal unless `view_weights` says otherwise)."""
        return [1.0 if self.view_weights is None else self.view_weights[view.name] for view in self.views]

    def to_dict(self, out_dir: Path | None = None) -> dict:
        """As a manifest's `image:` section (`parse_image`'s input): with `norms`, those instead of mean/std."""
        data = entry_dict(self, out_dir)
        if self.norms:
            del data["mean"], data["std"]
            data["norms"] = [{"mean": list(mean), "std": list(std)} for mean, std in self.norms]
        return data


@dataclass(frozen=True)
class KeyRules:
    """A tower entry's `checkpoint_keys`: how a checkpoint saved by other code maps onto the tower's keys, applied in
    this order: keys under an `ignore` prefix dropped (counted), a leading `strip` prefix removed, a leading
    `rename` prefix replaced (`{fc.: head.}`). Loading stays strict: every tower key must then be filled. `weights`
    names the set of weights to read from a file that holds several (a model and its EMA), before the rules."""

    strip: tuple[str, ...] = entry_field((), sparse=True, lone=True, hint="a list of key prefixes, e.g. [model.]")
    rename: dict[str, str] | None = entry_field(None, hint="old key prefixes to new ones, e.g. {fc.: head.}")
    ignore: tuple[str, ...] = entry_field((), sparse=True, lone=True, hint="a list of key prefixes, e.g. [text.]")
    # which set of a file holding several (timm's `state_dict_ema`, our trainer's `ema`)
    weights: str | None = entry_field(None, hint="the set of weights to read from a file that holds several, e.g. "
                                                  "state_dict_ema (timm's train.py) or ema")

    def to_dict(self, out_dir: Path | None = None) -> dict:
        return entry_dict(self, out_dir)


def sha256_problem(value: object) -> str | None:
    """Why an entry's `sha256` is not 64 hex digits (or left out), or None; a hash YAML read as a number says so."""
    import re

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ("YAML read this unquoted value as a number (an all-digit or exponent-like hash); put the 64 hex "
                "digits in quotes: sha256: \"...\"")
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{64}", value)):
        return "must be 64 hex digits (`sha256sum FILE`), or left out"
    return None


@dataclass(frozen=True, kw_only=True)
class TowerSpec:
    """What every tower of the ensemble has: a name, an ensemble weight, optional per-dimension weights.

    The kinds are subclasses, each in its module under `kaggle_i2p.kinds`; their fields are marked (`entry_field`),
    and the entry's keys, its writing, path rebasing and the cache's identity are derived from the marks.
    """

    kind: ClassVar[str]
    name: str = entry_field(identity=False)
    weight: float = entry_field(identity=False, hint="an ensemble weight; 0 switches a tower off", check=lambda v: (
        f"{v} is negative; ensemble weights must be >= 0 (use 0 to switch a tower off)" if is_number(v) and v < 0
        else None))
    dim_weights: np.ndarray | None = entry_field(None, written=False, repr=False, compare=False)  # the multipliers
    dim_weights_path: Path | None = entry_field(None, key="dim_weights", path=True, identity=False)  # their .npy

    @property
    def views(self) -> tuple[View, ...]:
        """The TTA views whose forward passes make this tower's output (none for a constant tower)."""
        return ()

    @property
    def n_views(self) -> int:
        return len(self.views)

    def view_weight_list(self) -> list[float]:
        return []

    def constant(self) -> np.ndarray | None:
        """The unit vector a tower without views gives every image (a prior's); None for a tower that computes."""
        return None

    def to_dict(self, out_dir: Path | None = None) -> dict:
        """The manifest entry that parses back to this spec; paths relative to `out_dir` (absolute when None)."""
        data = entry_dict(self, out_dir, self._arch_is_path)
        if self.kind != DEFAULT_KIND:
            data["kind"] = self.kind
        first = [key for key in LEADING_KEYS if key in data]  # what a reader looks for first, then the rest
        return {key: data[key] for key in [*first, *(k for k in data if k not in first)]}

    def _arch_is_path(self, arch: str) -> bool:
        return False

    def describe(self) -> str:
        """One line for `validate-manifest`."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class NetworkSpec(TowerSpec):
    """A tower that runs an image model: a registered library's backbone, its checkpoint and its preprocessing."""

    library: str = entry_field(check=lambda value: None if value in LIBRARIES else LIBRARIES.unknown(value))
    # a model name, or (a library that reads files) a config file's path
    arch: str = entry_field(path="arch", hint=lambda: "a model name of the tower's library, e.g. " + ", ".join(
        f"{lib.arch_example} ({lib.name})" for lib in LIBRARIES if lib.arch_example))
    # a file, a save_pretrained/save_model folder, or several (a tuple) merged: backbone + head in files of their own;
    # None only for a tower still being trained, or a program that holds every weight
    checkpoint: Path | tuple[Path, ...] | None = entry_field(path=True, identity=False)
    sha256: str | None = entry_field(None, identity=False, check=sha256_problem)
    image: ImageSpec = entry_field(section=ImageSpec)
    native_resolution: int | None = entry_field(None, bounds=(MIN_RESOLUTION, MAX_RESOLUTION), hint=(
        "the image size the checkpoint's position embeddings were trained at, or left out"))
    # what the backbone hands the head, by its library's choices (None: its default)
    features: str | None = entry_field(None, hint="e.g. pooled or logits")
    # the library's build options (timm: global_pool ...)
    backbone: dict | None = entry_field(None, key="backbone", hint="option names to values, e.g. {global_pool: token}")
    precision: Precision = entry_field("auto", identity=False)
    # torch.compile one callable per resolution
    compile: bool = entry_field(False, sparse=True, identity=False, hint="torch.compile each resolution")
    checkpoint_keys: KeyRules | None = entry_field(None, section=KeyRules, identity=False)  # the file's own names

    @property
    def views(self) -> tuple[View, ...]:
        return self.image.views

    def view_weight_list(self) -> list[float]:
        return self.image.view_weight_list()

    def _arch_is_path(self, arch: str) -> bool:
        return arch_is_path(self.library, arch)

    @property
    def weights_source(self) -> Path | tuple[Path, ...] | None:
        """What `sha256` checks: the checkpoint (one file, a folder, several), or a program tower's program (its
        library's `holds_weights`) when it has no checkpoint; None for one program per resolution (each is hashed in
        the cache key, and `sha256` is refused)."""
        if self.checkpoint is not None:
            return self.checkpoint
        files = LIBRARIES.get(self.library).arch_files(self.arch, self.image.resolutions)
        return Path(files[0]) if len(files) == 1 else None

    @property
    def weights_choice(self) -> str | None:
        """The set of weights to read from a checkpoint file that holds several (`checkpoint_keys.weights`)."""
        return self.checkpoint_keys.weights if self.checkpoint_keys is not None else None

    @property
    def checkpoint_label(self) -> str:
        """The checkpoint as messages name it: its path, or its paths joined with ` + `."""
        parts = self.checkpoint if isinstance(self.checkpoint, tuple) else (self.checkpoint,)
        return " + ".join(str(p) for p in parts if p is not None)

    def forward_dim(self, embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> int:
        """Width of a forward pass's output, the one the cache stores: what the tower's kind declares
        (`TowerKind.output`)."""
        return kind_of(self).output(self, embedding_dim).width

    @property
    def head_name(self) -> str:
        """What sits on the backbone, for messages: `mlp head`, `retrieval head`."""
        raise NotImplementedError

    def _describe_output(self) -> str:
        return self.head_name

    def describe(self) -> str:
        return (f"{self.library} {self.arch}, {self._describe_output()}, resolutions {list(self.image.resolutions)}"
                f"{' + hflip' if self.image.hflip else ''}, weight {self.weight:g}, "
                f"{self.checkpoint_label if self.checkpoint is not None else 'weights in the program'}")


@dataclass(frozen=True)
class ParseContext:
    """What a tower's parser needs besides its entry: where paths resolve, where problems go, what to check."""

    base_dir: Path
    problems: Problems
    check_files: bool = True
    embedding_dim: int = DEFAULT_EMBEDDING_DIM
    needs_checkpoint: bool = True  # False for the trainer's tower, whose checkpoint is written by export


class TowerKind:
    """A tower kind: its spec class, its manifest parser, and its answers to what generic code asks. A kind is one
    module under `kaggle_i2p.kinds` (or a plugin's) that subclasses this and registers an instance."""

    name: ClassVar[str]
    spec: ClassVar[type[TowerSpec]]
    reported_keys: ClassVar[frozenset[str]] = frozenset()  # other kinds' keys this kind's parser words itself
    # what its backbone must give, when only some libraries' backbones can (a caption tower's captions)
    backbone_features: ClassVar[str | None] = None

    def parse(self, raw: Mapping, name: str, label: str, ctx: ParseContext) -> TowerSpec | None:
        """The entry as this kind's spec; None (its problems added to `ctx`) when it has any problem."""
        raise NotImplementedError

    def backbone_outputs(self, spec: NetworkSpec) -> int:
        """The classifier outputs the backbone must end in (0: its pooled features)."""
        return 0

    def build_head(self, spec: NetworkSpec, in_dim: int, embedding_dim: int) -> nn.Module:
        """The module on the backbone's output."""
        raise NotImplementedError(f"a {self.name} tower runs no network")

    def deep_problems(self, spec: TowerSpec, label: str) -> list[str]:
        """What `validate-manifest --deep` checks besides the checkpoint (files read whole), one line each."""
        return []

    def reads(self, spec: TowerSpec) -> tuple[str, ...]:
        """The towers (by name) whose results this tower reads: a run runs them whatever their weight (an
        interrogator's base caption tower, a fusion tower's inputs)."""
        source = self.text_source(spec) if isinstance(spec, NetworkSpec) else None
        return (source,) if source else ()

    def resolve(self, spec: TowerSpec, towers: Mapping[str, TowerSpec], label: str, embedding_dim: int,
                problems: Problems) -> TowerSpec:
        """The spec completed from the other towers of its manifest (a fusion tower's input widths), its problems
        with them added; once every tower of the manifest has parsed."""
        return spec

    def combines(self, spec: TowerSpec) -> bool:
        """Whether this tower's embedding is made from other towers' results after they are all computed (a fusion
        tower), by `combine`, rather than by views of its own."""
        return False

    def combine(self, spec: TowerSpec, embeddings: Mapping[str, np.ndarray], features: Mapping[str, np.ndarray],
                device: str | torch.device) -> np.ndarray:
        """The tower's (images, embedding_dim) outputs from the others' embeddings and features (a row non-finite
        where an input's was)."""
        raise NotImplementedError(f"a {self.name} tower combines nothing")

    def gives_embeddings(self, spec: TowerSpec) -> bool:
        """Whether the tower's output is an embedding the ensemble can weight (a features tower's is not)."""
        return True

    def cache_identity(self, spec: NetworkSpec, entry: dict) -> dict:
        """The tower's identity for the cache, from its entry without the fields that do not change its outputs."""
        return entry

    def has_step_after_encoding(self, spec: NetworkSpec) -> bool:
        """Whether this tower's forward outputs become embeddings only after every image is encoded."""
        return False

    example_library: ClassVar[str | None] = None  # the one library its example runs with (None: any)

    def example(self, folder: Path, out_dim: int, embedding_dim: int) -> KindExample | None:
        """The kind's smallest tower, its files written into `folder` (random weights): a network kind's keys for
        a backbone of `out_dim` features (`KindExample`); None: it has none. A kind's example lives with the kind."""
        return None

    def output(self, spec: NetworkSpec, embedding_dim: int) -> OutputSpec:
        """What a view's forward gives (`ViewOutput`): its width (the embedding, unless the step after encoding
        makes the embedding from something else: a retrieval tower's queries), whether it makes a text per image (a
        caption tower's captions), and what a row without a value means."""
        return OutputSpec(embedding_dim)

    def text_models(self, spec: NetworkSpec) -> list[Path]:
        """The all-MiniLM-L6-v2 folders this tower embeds texts with (a caption tower's), which the dry-run checks
        against sample_submission.csv."""
        return []

    def text_source(self, spec: NetworkSpec) -> str | None:
        """The tower (by name) whose texts this tower's step after encoding reads (an interrogator's base
        caption), or None; the manifest checks it is a text-making tower, and a run runs it whatever its weight."""
        return None

    def after_encoding(self, spec: NetworkSpec, outputs: np.ndarray, context: EncodingContext) -> np.ndarray:
        """The step after encoding: (rows, forward_dim) outputs of every image and view (finite rows only) to
        (rows, embedding_dim) unit embeddings, all at once (a retrieval tower's one pass over its bank); `context`
        holds the device, whether to show progress, and the texts of the tower `text_source` names, a row each."""
        raise NotImplementedError


@dataclass(frozen=True)
class KindExample:
    """A kind's smallest tower (`TowerKind.example`), how the kind proves itself: `kaggle-i2p selfcheck` runs it on
    the bundled sample images, and the registry tests take it through every step. `entry`: the kind's own keys,
    merged into a tower on a library's example (a network kind), or the whole entry but its name and weight
    (`network=False`: a prior's constant); `companions`: towers it needs beside it (a features tower's fusion
    reader); `reads_input`: it is made of a tower named "input" (a fusion), for which a tiny regressor on the
    library goes beside it."""

    entry: dict
    companions: tuple[dict, ...] = ()
    network: bool = True
    reads_input: bool = False


@dataclass(frozen=True)
class OutputSpec:
    """What a kind's view forward gives: `width` values per row, a text per row when `texts`, and what a row the
    tower gave no value for lacks, for the run's list of fallbacks (`missing`: "tower 'blip' made no caption for
    it", "2 fallbacks (2 with no caption)")."""

    width: int
    texts: bool = False
    missing: str = "no output"


class ViewOutput(NamedTuple):
    """One TTA view's forward over a batch, as one record: `values` (rows, width), `present` (rows,) bool, the rows
    with a value (None: every row; a missing row is no value by design, which no precision gives it), and `texts`,
    one per row, for a kind that makes them (None otherwise). A tower's forward may return a bare tensor: every row
    present, no texts. Tensors while computed, numpy arrays once stored."""

    values: Any
    present: Any = None
    texts: list[str] | None = None


@dataclass(frozen=True)
class EncodingContext:
    """What the step after encoding is given besides the outputs: where it runs, whether it shows progress, and
    (for a kind with a `text_source`) that tower's text for each output row."""

    device: str | torch.device = "cpu"
    progress: bool = False
    texts: list[str] | None = None


OLD_AFTER_ENCODING = ("device", "progress")  # a plugin's after_encoding(spec, outputs, device, progress), until 0.3.0


def run_after_encoding(kind: TowerKind, spec: NetworkSpec, outputs: np.ndarray, context: EncodingContext
                       ) -> np.ndarray:
    """`kind.after_encoding` with its context; a plugin kind written for the old signature (device, progress as
    arguments) is called that way, with a FutureWarning naming the new one."""
    import inspect
    import warnings

    names = list(inspect.signature(kind.after_encoding).parameters)
    if names[2:4] == list(OLD_AFTER_ENCODING):
        warnings.warn(f"tower kind {kind.name!r}: after_encoding(spec, outputs, device, progress) is the old "
                      "signature; take (spec, outputs, context) with context.device, .progress and .texts (the old "
                      "one goes in kaggle_i2p 0.3.0)", FutureWarning, stacklevel=2)
        return kind.after_encoding(spec, outputs, context.device, context.progress)
    return kind.after_encoding(spec, outputs, context)


def arch_is_path(library: object, arch: str) -> bool:
    """Whether the registered library `library` reads `arch` as a model-config file (False for one not registered):
    the one question the parser, the writer and path rebasing ask."""
    return library in LIBRARIES and LIBRARIES.get(library).arch_is_path(arch)


def kind_of(spec: TowerSpec) -> TowerKind:
    """The registered kind of a spec."""
    return KINDS.get(spec.kind)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: towers in declaration order, the fallback unit vector, the output dimension."""

    path: Path
    embedding_dim: int
    fallback_path: Path
    fallback: np.ndarray = field(repr=False, compare=False)
    towers: tuple[TowerSpec, ...]

    @property
    def weights(self) -> dict[str, float]:
        return {t.name: t.weight for t in self.towers}

    @property
    def dim_weights(self) -> dict[str, np.ndarray]:
        return {t.name: t.dim_weights for t in self.towers if t.dim_weights is not None}

    def readers(self) -> dict[str, list[TowerSpec]]:
        """Tower name -> the weighted towers that read its results (a fusion's inputs, an interrogator's base
        caption), directly or through another read tower: a run runs it whatever its own weight."""
        by_name = {t.name: t for t in self.towers}
        out: dict[str, list[TowerSpec]] = {}
        stack = [t for t in self.towers if t.weight > 0]
        seen: set[str] = set()
        while stack:
            reader = stack.pop()
            for name in kind_of(reader).reads(reader):
                other = by_name.get(name)
                if other is None:
                    continue
                root = reader if reader.weight > 0 else next(iter(out.get(reader.name, [reader])))
                out.setdefault(name, []).append(root)
                if name not in seen:
                    seen.add(name)
                    stack.append(other)
        return out

    @property
    def running_towers(self) -> list[TowerSpec]:
        """The towers a run runs, in manifest order: weighted ones, and those weighted ones read."""
        read = self.readers()
        return [t for t in self.towers if t.weight > 0 or t.name in read]

    def to_dict(self, out_dir: Path | None = None) -> dict:
        """The manifest as data that parses back to it; paths relative to `out_dir` (absolute when None)."""
        return {"embedding_dim": self.embedding_dim, "fallback": path_text(self.fallback_path, out_dir),
                "towers": [tower.to_dict(out_dir) for tower in self.towers]}


def tower_label(index: int, name: object) -> str:
    """How every problem names a tower: `tower 'vit' (towers[2])`, or `towers[2]` when it has no usable name."""
    return f"tower {name!r} (towers[{index}])" if isinstance(name, str) and name else f"towers[{index}]"
