"""The weights manifest: which towers to run, how to preprocess for each, and how to weight them.

The manifest is data, and this module owns it in both directions: `load_manifest` parses and validates a file
completely (schema, paths, weights, the fallback vector) before any model code runs, reporting every problem at once,
each naming the tower, the field and the fix; `Manifest.to_dict` / `save_manifest` / `write_manifest` write one
(validated first, then atomically), with every path field rebased to the folder it is written to.

A tower is one of three kinds, each its own spec class (`TOWER_KINDS`): `RegressorSpec` (an image model with a head
regressing the prompt embedding), `RetrievalSpec` (an image model whose scores select texts of a bank) and `PriorSpec`
(a constant vector, no views). Architecture-level checks (does the arch exist, do the resolutions fit it) live in
`towers.check_architectures`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, get_args

import numpy as np
import yaml

from ._validate import Problems, expand_path, is_int, is_number, read_yaml, resolve_file
from .errors import I2PError, InputFileError
from .fileio import atomic_open, npy_header

Library = Literal["timm", "open_clip"]
Score = Literal["logits", "embedding"]
Search = Literal["exact", "index"]
HeadType = Literal["linear", "mlp"]
HeadNorm = Literal["batchnorm", "layernorm", "none"]
HeadActivation = Literal["relu", "gelu"]
Interpolation = Literal["bicubic", "bilinear", "nearest"]
ResizeMode = Literal["squash", "shorter_side_center_crop"]
TrainPrecision = Literal["auto", "fp32", "fp16", "bf16"]  # autocast dtypes (training keeps fp32 weights)
Precision = Literal[TrainPrecision, "fp16-weights"]  # inference may also hold the weights in fp16

LIBRARIES: tuple[str, ...] = get_args(Library)
SCORES: tuple[str, ...] = get_args(Score)
SEARCHES: tuple[str, ...] = get_args(Search)
HEAD_TYPES: tuple[str, ...] = get_args(HeadType)
HEAD_NORMS: tuple[str, ...] = get_args(HeadNorm)
HEAD_ACTIVATIONS: tuple[str, ...] = get_args(HeadActivation)
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
PRECISIONS: tuple[str, ...] = get_args(Precision)  # the one list: manifest and CLI --precision
TRAIN_PRECISIONS: tuple[str, ...] = get_args(TrainPrecision)  # the training config's
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")

TOP_KEYS = {"embedding_dim", "fallback", "towers"}
NETWORK_KEYS = {"name", "kind", "library", "arch", "checkpoint", "sha256", "native_resolution", "head", "image",
                "weight", "precision", "compile", "dim_weights", "retrieval"}
PRIOR_KEYS = {"name", "kind", "vector", "weight", "dim_weights"}
RETRIEVAL_KEYS = {"bank", "k", "temperature", "score", "search", "nprobe", "candidates"}
HEAD_KEYS = {"type", "hidden", "norm", "activation"}
IMAGE_KEYS = {"mean", "std", "interpolation", "resize", "resolutions", "hflip", "view_weights"}

DEFAULT_EMBEDDING_DIM = 384  # all-MiniLM-L6-v2
MIN_RESOLUTION, MAX_RESOLUTION = 32, 1024
DEFAULT_RETRIEVAL_K, DEFAULT_RETRIEVAL_TEMPERATURE = 10, 1.0  # a retrieval tower's soft top-k when not given


class ManifestError(I2PError, ValueError):
    """A manifest that cannot be used; the message lists every problem found, one per line."""

    def __init__(self, path: str | Path, problems: list[str], clean_towers: list | None = None,
                 embedding_dim: int = DEFAULT_EMBEDDING_DIM):
        self.path = str(path)
        self.problems = problems
        self.clean_towers: list[tuple[int, TowerSpec]] = clean_towers or []  # parsed without a problem of their own
        self.embedding_dim = embedding_dim
        super().__init__(f"{self.path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


def _path_text(path: Path, out_dir: Path | None) -> str:
    """How a resolved path is written into a manifest in `out_dir`: relative to it (absolute when not given)."""
    return str(path) if out_dir is None else os.path.relpath(path, out_dir)


class View(NamedTuple):
    """One TTA view of a tower: its name (r336, r336_flip), input resolution and whether it is mirrored."""

    name: str
    resolution: int
    flip: bool


@dataclass(frozen=True)
class HeadSpec:
    """The regression head on top of the backbone's pooled features: `linear`, or `mlp` (Linear-norm-act-Linear)."""

    type: HeadType = "linear"
    hidden: int | None = None
    norm: HeadNorm = "batchnorm"
    activation: HeadActivation = "relu"

    def to_dict(self) -> dict:
        """As a manifest's `head:` section (`parse_head`'s input)."""
        if self.type == "linear":
            return {"type": "linear"}
        return {"type": self.type, "hidden": self.hidden, "norm": self.norm, "activation": self.activation}


@dataclass(frozen=True)
class ImageSpec:
    """How a decoded uint8 image becomes this tower's input: resize, normalise, TTA resolutions and flip."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Interpolation
    resize: ResizeMode
    resolutions: tuple[int, ...]
    hflip: bool = False
    view_weights: dict[str, float] | None = None  # by view name (r336, r336_flip); None = equal

    @property
    def views(self) -> tuple[View, ...]:
        """Every TTA view, in order: each resolution, then its mirror when `hflip`."""
        return tuple(View(f"r{r}_flip" if flip else f"r{r}", r, flip) for r in self.resolutions
                     for flip in ((False, True) if self.hflip else (False,)))

    @property
    def n_views(self) -> int:
        return len(self.views)

    def view_weight_list(self) -> list[float]:
        """One weight per view, in `views` order (equal unless `view_weights` says otherwise)."""
        return [1.0 if self.view_weights is None else self.view_weights[view.name] for view in self.views]

    def to_dict(self) -> dict:
        """As a manifest's `image:` section (`parse_image`'s input)."""
        data = {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
                "resize": self.resize, "resolutions": list(self.resolutions), "hflip": self.hflip}
        if self.view_weights is not None:
            data["view_weights"] = dict(self.view_weights)
        return data


@dataclass(frozen=True)
class RetrievalOptions:
    """A retrieval tower's `retrieval:` section: its bank and how its scores become an embedding (soft top-k)."""

    bank: Path
    k: int
    temperature: float
    score: Score  # logits: a classifier whose classes are the bank's rows; embedding: queries in the keys' space
    rows: int  # read from the bank, not written
    key_dim: int | None  # the bank's key width (None: a class bank without keys)
    search: Search = "exact"  # embedding scores: one exact pass over the keys, or the bank's FAISS index
    nprobe: int | None = None  # index search: inverted lists visited per query (None: the bank's measured default)
    candidates: int | None = None  # index search: rows proposed per query, then scored exactly (None: 8 x k)

    @property
    def score_dim(self) -> int:
        """How many scores the network must give: one per bank row (logits), or a query in the keys' space."""
        return self.rows if self.score == "logits" else int(self.key_dim or 0)

    @property
    def searches_bank(self) -> bool:
        """Queries in the keys' space: found by one pass over the bank for the whole run, after every image is
        encoded (logits already score every row, so their top-k is taken per batch)."""
        return self.score == "embedding"

    def to_dict(self, out_dir: Path | None = None) -> dict:
        data = {"bank": _path_text(self.bank, out_dir), "k": self.k, "temperature": self.temperature,
                "score": self.score}
        if self.search != "exact":
            data["search"] = self.search
        for option in ("nprobe", "candidates"):
            if getattr(self, option) is not None:
                data[option] = getattr(self, option)
        return data


@dataclass(frozen=True, kw_only=True)
class TowerSpec:
    """What every tower of the ensemble has: a name, an ensemble weight, optional per-dimension weights.

    The kinds are subclasses (`TOWER_KINDS`); each parses its own fields and writes them back (`to_dict`).
    """

    kind: ClassVar[str]
    name: str
    weight: float
    dim_weights: np.ndarray | None = field(default=None, repr=False, compare=False)  # per-dimension multipliers
    dim_weights_path: Path | None = None  # the .npy `dim_weights` came from

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
        data: dict[str, Any] = {"name": self.name, "kind": self.kind, "weight": self.weight}
        if self.dim_weights_path is not None:
            data["dim_weights"] = _path_text(self.dim_weights_path, out_dir)
        return data

    def describe(self) -> str:
        """One line for `validate-manifest`."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class PriorSpec(TowerSpec):
    """A constant tower: the same unit vector (e.g. the mean prompt embedding) for every image; no views, no network."""

    kind: ClassVar[str] = "prior"
    vector: np.ndarray = field(repr=False, compare=False)
    vector_path: Path

    def constant(self) -> np.ndarray:
        return self.vector

    def to_dict(self, out_dir: Path | None = None) -> dict:
        data = super().to_dict(out_dir)
        data["vector"] = _path_text(self.vector_path, out_dir)
        return data

    def describe(self) -> str:
        return f"prior (a constant vector), weight {self.weight:g}"


@dataclass(frozen=True, kw_only=True)
class NetworkSpec(TowerSpec):
    """A tower that runs an image model: a timm or open_clip backbone, its checkpoint and its preprocessing."""

    library: Library
    arch: str  # a model name, or (open_clip) the resolved path of a model-config .json
    checkpoint: Path | None  # None only for a tower still being trained (the trainer's config)
    image: ImageSpec
    sha256: str | None = None
    native_resolution: int | None = None
    precision: Precision = "auto"
    compile: bool = False  # torch.compile one callable per resolution (CUDA with Triton; see predict.TowerRunner)

    @property
    def views(self) -> tuple[View, ...]:
        return self.image.views

    def view_weight_list(self) -> list[float]:
        return self.image.view_weight_list()

    @property
    def classes(self) -> int:
        """Classifier outputs the backbone must end in (0: its pooled features)."""
        return 0

    @property
    def bank_search(self) -> RetrievalOptions | None:
        """The bank searched once per run with this tower's queries (step 6 of a run); None for most towers."""
        return None

    def forward_dim(self, embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> int:
        """Width of a forward pass's output, the one the cache stores: the embedding, or the query of a tower that
        searches its bank once per run."""
        raise NotImplementedError

    @property
    def head_name(self) -> str:
        """What sits on the backbone, for messages: `mlp head`, `retrieval head`."""
        raise NotImplementedError

    def to_dict(self, out_dir: Path | None = None) -> dict:
        data: dict[str, Any] = {"name": self.name, "library": self.library, "kind": self.kind}
        data["arch"] = _path_text(Path(self.arch), out_dir) if self.arch.endswith(".json") else self.arch
        if self.checkpoint is not None:
            data["checkpoint"] = _path_text(self.checkpoint, out_dir)
        if self.sha256 is not None:
            data["sha256"] = self.sha256
        data.update(self._output_section(out_dir))
        data.update(image=self.image.to_dict(), weight=self.weight, precision=self.precision)
        if self.compile:
            data["compile"] = True
        if self.native_resolution is not None:
            data["native_resolution"] = self.native_resolution
        if self.dim_weights_path is not None:
            data["dim_weights"] = _path_text(self.dim_weights_path, out_dir)
        return data

    def _output_section(self, out_dir: Path | None) -> dict:
        """The kind's own section of the entry (`head:` or `retrieval:`)."""
        raise NotImplementedError

    def _describe_output(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return (f"{self.library} {self.arch}, {self._describe_output()}, resolutions {list(self.image.resolutions)}"
                f"{' + hflip' if self.image.hflip else ''}, weight {self.weight:g}, {self.checkpoint}")


@dataclass(frozen=True, kw_only=True)
class RegressorSpec(NetworkSpec):
    """An image model with a head regressing the prompt embedding."""

    kind: ClassVar[str] = "regressor"
    head: HeadSpec = HeadSpec()

    def forward_dim(self, embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> int:
        return embedding_dim

    @property
    def head_name(self) -> str:
        return f"{self.head.type} head"

    def to_dict(self, out_dir: Path | None = None) -> dict:
        data = super().to_dict(out_dir)
        del data["kind"]  # the default kind, left out as export always wrote it
        return data

    def _output_section(self, out_dir: Path | None) -> dict:
        return {"head": self.head.to_dict()}

    def _describe_output(self) -> str:
        return self.head_name


@dataclass(frozen=True, kw_only=True)
class RetrievalSpec(NetworkSpec):
    """An image model whose scores (class logits, or an embedding) select texts of a bank: no head of its own."""

    kind: ClassVar[str] = "retrieval"
    retrieval: RetrievalOptions

    @property
    def classes(self) -> int:
        return self.retrieval.rows if self.retrieval.score == "logits" else 0

    @property
    def bank_search(self) -> RetrievalOptions | None:
        return self.retrieval if self.retrieval.searches_bank else None

    def forward_dim(self, embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> int:
        return self.retrieval.score_dim if self.retrieval.searches_bank else embedding_dim

    @property
    def head_name(self) -> str:
        return "retrieval head (no parameters)"

    def _output_section(self, out_dir: Path | None) -> dict:
        return {"retrieval": self.retrieval.to_dict(out_dir)}

    def _describe_output(self) -> str:
        options = self.retrieval
        search = f", {options.search} search" if options.searches_bank else ""
        return (f"retrieval by {options.score} over {options.rows} bank rows ({options.bank}){search}, "
                f"k={options.k}, temperature {options.temperature:g}")


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

    def to_dict(self, out_dir: Path | None = None) -> dict:
        """The manifest as data that parses back to it; paths relative to `out_dir` (absolute when None)."""
        return {"embedding_dim": self.embedding_dim, "fallback": _path_text(self.fallback_path, out_dir),
                "towers": [tower.to_dict(out_dir) for tower in self.towers]}


def tower_label(index: int, name: object) -> str:
    """How every problem names a tower: `tower 'vit' (towers[2])`, or `towers[2]` when it has no usable name."""
    return f"tower {name!r} (towers[{index}])" if isinstance(name, str) and name else f"towers[{index}]"


@dataclass(frozen=True)
class ParseContext:
    """What a tower's parser needs besides its entry: where paths resolve, where problems go, what to check."""

    base_dir: Path
    problems: Problems
    check_files: bool = True
    embedding_dim: int = DEFAULT_EMBEDDING_DIM
    needs_checkpoint: bool = True  # False for the trainer's tower, whose checkpoint is written by export


def _parse_head(raw: Any, where: str, problems: Problems) -> HeadSpec:
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, Mapping):
        problems.add(where, "must be a mapping like {type: linear} or {type: mlp, hidden: 1024}")
        return HeadSpec()
    problems.unknown_keys(raw, HEAD_KEYS, where)
    head_type = raw.get("type", "linear")
    if head_type not in HEAD_TYPES:
        problems.add(f"{where}.type", f"{head_type!r} is not one of {', '.join(HEAD_TYPES)}")
    hidden = raw.get("hidden")
    if head_type == "mlp" and not (isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0):
        problems.add(f"{where}.hidden", "an mlp head needs a positive integer hidden size, e.g. hidden: 1024")
    if head_type == "linear" and hidden is not None:
        problems.add(f"{where}.hidden", "a linear head has no hidden size; remove it or use type: mlp")
    norm = raw.get("norm", "batchnorm")
    if norm not in HEAD_NORMS:
        problems.add(f"{where}.norm", f"{norm!r} is not one of {', '.join(HEAD_NORMS)}")
    activation = raw.get("activation", "relu")
    if activation not in HEAD_ACTIVATIONS:
        problems.add(f"{where}.activation", f"{activation!r} is not one of {', '.join(HEAD_ACTIVATIONS)}")
    return HeadSpec(type=head_type, hidden=hidden, norm=norm, activation=activation)


def _parse_triplet(raw: Any, where: str, problems: Problems, positive: bool) -> tuple[float, float, float]:
    if isinstance(raw, (list, tuple)) and len(raw) == 3 and all(is_number(v) for v in raw):
        if positive and any(v <= 0 for v in raw):
            problems.add(where, f"{list(raw)} must be three positive numbers")
        return tuple(float(v) for v in raw)  # type: ignore[return-value]
    problems.add(where, "must be a list of three numbers (per RGB channel, on the 0-1 scale), "
                        "e.g. [0.48145466, 0.4578275, 0.40821073] for OpenAI CLIP")
    return (0.0, 0.0, 0.0) if not positive else (1.0, 1.0, 1.0)


def _parse_image(raw: Any, where: str, problems: Problems) -> ImageSpec:
    if not isinstance(raw, Mapping):
        problems.add(where, "must be a mapping with mean, std, interpolation, resize, resolutions (and hflip)")
        raw = {}
    problems.unknown_keys(raw, IMAGE_KEYS, where)
    for key in ("mean", "std", "interpolation", "resize", "resolutions"):
        if key not in raw:
            problems.add(f"{where}.{key}", "is required: preprocessing is never guessed; copy it from the "
                                           "training config of this checkpoint")
    mean = _parse_triplet(raw.get("mean"), f"{where}.mean", problems, positive=False) if "mean" in raw else (0, 0, 0)
    std = _parse_triplet(raw.get("std"), f"{where}.std", problems, positive=True) if "std" in raw else (1, 1, 1)
    interpolation = raw.get("interpolation", "bicubic")
    if "interpolation" in raw and interpolation not in INTERPOLATIONS:
        problems.add(f"{where}.interpolation", f"{interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    resize = raw.get("resize", "squash")
    if "resize" in raw and resize not in RESIZE_MODES:
        problems.add(f"{where}.resize", f"{resize!r} is not one of {', '.join(RESIZE_MODES)}")
    resolutions = raw.get("resolutions", [])
    if isinstance(resolutions, int) and not isinstance(resolutions, bool):
        resolutions = [resolutions]
    good: list[int] = []
    if "resolutions" in raw:
        if not isinstance(resolutions, (list, tuple)) or not resolutions:
            problems.add(f"{where}.resolutions", "must be a non-empty list of image sizes in pixels, e.g. [336, 448]")
        else:
            for r in resolutions:
                if not isinstance(r, int) or isinstance(r, bool) or not MIN_RESOLUTION <= r <= MAX_RESOLUTION:
                    problems.add(f"{where}.resolutions", f"{r!r} must be an integer between {MIN_RESOLUTION} and "
                                                         f"{MAX_RESOLUTION}")
                elif r in good:
                    problems.add(f"{where}.resolutions", f"{r} is listed twice; each TTA view once")
                else:
                    good.append(r)
    hflip = raw.get("hflip", False)
    if not isinstance(hflip, bool):
        problems.add(f"{where}.hflip", f"{hflip!r} must be true or false")
        hflip = False
    spec = ImageSpec(mean=mean, std=std, interpolation=interpolation, resize=resize, resolutions=tuple(good),
                     hflip=hflip)
    raw_view_weights = raw.get("view_weights")
    if raw_view_weights is None:
        return spec
    names = [view.name for view in spec.views]
    if not isinstance(raw_view_weights, Mapping):
        problems.add(f"{where}.view_weights", f"must map view names ({', '.join(names)}) to weights >= 0")
        return spec
    for name in sorted(set(raw_view_weights) - set(names)):
        problems.add(f"{where}.view_weights.{name}", f"is not a view of this tower; its views are {', '.join(names)}")
    for name in names:
        if not is_number(raw_view_weights.get(name)) or raw_view_weights[name] < 0:
            problems.add(f"{where}.view_weights.{name}", "needs a weight >= 0 for every view")
    values = [raw_view_weights.get(n) for n in names]
    if all(is_number(v) and v >= 0 for v in values):
        if sum(values) <= 0:
            problems.add(f"{where}.view_weights", "are all zero; give at least one view a positive weight")
        return replace(spec, view_weights={n: float(v) for n, v in zip(names, values, strict=True)})
    return spec



def _parse_dim_weights(raw: Mapping, label: str, ctx: ParseContext) -> tuple[np.ndarray | None, Path | None]:
    """An entry's optional `dim_weights` (.npy of per-dimension multipliers) and the file it came from."""
    if raw.get("dim_weights") is None:
        return None, None
    where, problems, dim = f"{label}.dim_weights", ctx.problems, ctx.embedding_dim
    path = resolve_file(raw["dim_weights"], ctx.base_dir, where, problems, "per-dimension weights (.npy)")
    if path is None:
        return None, None
    try:
        weights = np.load(path, allow_pickle=False).astype(np.float32).reshape(-1)
    except (OSError, ValueError) as err:
        problems.add(where, f"cannot read {path}: {err}")
        return None, None
    if weights.shape != (dim,) or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        problems.add(where, f"{path} must hold {dim} finite weights >= 0, not all zero (kaggle-i2p tune --per-dim)")
        return None, None
    return weights, path


def _parse_weight(raw: Mapping, label: str, problems: Problems) -> float:
    weight = raw.get("weight")
    if "weight" in raw and not is_number(weight):
        problems.add(f"{label}.weight", f"{weight!r} must be a number >= 0")
        return 0.0
    if is_number(weight) and weight < 0:
        problems.add(f"{label}.weight", f"{weight} is negative; ensemble weights must be >= 0 "
                                        "(use 0 to switch a tower off)")
    return float(weight) if is_number(weight) else 0.0


def _parse_prior(raw: Mapping, name: str, label: str, ctx: ParseContext) -> PriorSpec | None:
    """A constant tower: the same unit vector (e.g. the mean prompt embedding) for every image."""
    problems, before = ctx.problems, ctx.problems.mark()
    problems.unknown_keys(raw, PRIOR_KEYS, label, what="key for a prior tower")
    for key in ("vector", "weight"):
        if key not in raw:
            problems.add(f"{label}.{key}", "is required")
    vector, path = None, None
    if "vector" in raw:
        path = resolve_file(raw["vector"], ctx.base_dir, f"{label}.vector", problems, "prior vector (.npy)")
        if path is not None:
            try:
                vector = load_fallback(path, ctx.embedding_dim)
            except (ValueError, OSError) as err:
                problems.add(f"{label}.vector", f"{path} {err}")
    weight = _parse_weight(raw, label, problems)
    dim_weights, dim_weights_path = _parse_dim_weights(raw, label, ctx)
    if problems.blocking_since(before):
        return None
    return PriorSpec(name=name, weight=weight, dim_weights=dim_weights, dim_weights_path=dim_weights_path,
                     vector=vector, vector_path=path)


def _parse_retrieval(raw: Any, where: str, ctx: ParseContext) -> RetrievalOptions | None:
    problems = ctx.problems
    if not isinstance(raw, Mapping):
        problems.add(where, "must be a mapping with bank, k, temperature, score")
        return None
    problems.unknown_keys(raw, RETRIEVAL_KEYS, where)
    k, temperature = raw.get("k", DEFAULT_RETRIEVAL_K), raw.get("temperature", DEFAULT_RETRIEVAL_TEMPERATURE)
    score = raw.get("score", "logits")
    if not (is_int(k) and k >= 1):
        problems.add(f"{where}.k", f"{k!r} must be an integer >= 1 (texts averaged per image)")
    if not (is_number(temperature) and temperature > 0):
        problems.add(f"{where}.temperature", f"{temperature!r} must be a number > 0")
    if score not in SCORES:
        problems.add(f"{where}.score", f"{score!r} is not one of {', '.join(SCORES)}")
    raw_bank = raw.get("bank")
    if not isinstance(raw_bank, str):
        problems.add(f"{where}.bank", "is required: the folder written by `kaggle-i2p build-bank`")
        return None
    try:
        bank = expand_path(raw_bank, ctx.base_dir)
    except KeyError as err:
        problems.add(f"{where}.bank", f"environment variable {err.args[0]} is not set (in {raw_bank!r})")
        return None
    if not (bank / "targets.npy").is_file():
        problems.add(f"{where}.bank", f"{bank} is not a bank folder (no targets.npy); build it with "
                                      "`kaggle-i2p build-bank`")
        return None
    try:  # headers and sizes only: a truncated or damaged array is a problem here, never after the compute
        targets_shape, _ = npy_header(bank / "targets.npy", "bank targets")
        keys_shape = npy_header(bank / "keys.npy", "bank keys")[0] if (bank / "keys.npy").is_file() else None
    except InputFileError as err:
        problems.add(f"{where}.bank", f"{err}; rebuild the bank with `kaggle-i2p build-bank`")
        return None
    if len(targets_shape) != 2 or targets_shape[1] != ctx.embedding_dim:
        problems.add(f"{where}.bank", f"{bank}/targets.npy has shape {targets_shape}; expected (rows, "
                                      f"{ctx.embedding_dim})")
    if keys_shape is not None and (len(keys_shape) != 2 or keys_shape[0] != targets_shape[0]):
        problems.add(f"{where}.bank", f"{bank}/keys.npy has shape {keys_shape}; expected ({targets_shape[0]}, "
                                      "key width): one row per text")
        keys_shape = None
    keys = keys_shape  # (rows, width) of the keys, or None
    if score == "embedding" and keys is None:
        problems.add(f"{where}.score", f"embedding scores need {bank}/keys.npy (a bank built with keys)")
    search, nprobe, candidates = _parse_search(raw, where, bank, keys, score, problems)
    return RetrievalOptions(bank=bank, k=int(k) if is_int(k) else DEFAULT_RETRIEVAL_K,
                            temperature=float(temperature) if is_number(temperature)
                            else DEFAULT_RETRIEVAL_TEMPERATURE,
                            score=str(score), rows=int(targets_shape[0]),
                            key_dim=None if keys is None else int(keys[1]), search=search, nprobe=nprobe,
                            candidates=candidates)


def _stale_index(bank: Path, keys: tuple[int, int]) -> str | None:
    """Why the bank's index does not belong to its keys (checked before any compute), or None."""
    from .search import INDEX_FILE

    try:
        entry = json.loads((bank / "bank.json").read_text(encoding="utf-8")).get("index") or {}
    except (OSError, ValueError):
        return "has no entry in bank.json to check it against"
    from .search import index_header_problem

    if (problem := index_header_problem(bank / INDEX_FILE, *keys)) is not None:
        return problem
    actual = {"rows": keys[0], "dim": keys[1], "bytes": (bank / INDEX_FILE).stat().st_size}
    differ = [f"{name} {entry.get(name)} (now {value})" for name, value in actual.items() if entry.get(name) != value]
    return f"was built for other keys or was changed: bank.json says {', '.join(differ)}" if differ else None


def _parse_search(raw: Mapping, where: str, bank: Path, keys: tuple[int, int] | None, score: Any, problems: Problems
                  ) -> tuple[Any, int | None, int | None]:
    """`search`, `nprobe`, `candidates`: an index search needs embedding scores, the bank's index file and FAISS."""
    from .search import INDEX_FILE  # here: search.py brings torch, which validating a manifest needs only then

    search = raw.get("search", "exact")
    if search not in SEARCHES:
        problems.add(f"{where}.search", f"{search!r} is not one of {', '.join(SEARCHES)}")
        return "exact", None, None
    numbers = {}
    for option, meaning in (("nprobe", "inverted lists visited per query"),
                            ("candidates", "rows the index proposes per query")):
        value = raw.get(option)
        if value is not None and not (is_int(value) and value >= 1):
            problems.add(f"{where}.{option}", f"{value!r} must be an integer >= 1 ({meaning})")
        elif value is not None and search != "index":
            problems.add(f"{where}.{option}", "only for search: index")
        else:
            numbers[option] = value
    if search == "index":
        if score != "embedding":
            problems.add(f"{where}.search", "an index searches keys: it needs score: embedding")
        elif not (bank / INDEX_FILE).is_file():
            problems.add(f"{where}.search", f"{bank} has no {INDEX_FILE}; build the bank with `kaggle-i2p "
                                            "build-bank --index ivf-pq`, or use search: exact")
        elif keys is not None and (stale := _stale_index(bank, keys)) is not None:
            problems.add(f"{where}.search", f"{bank}/{INDEX_FILE} {stale}; rebuild it with `kaggle-i2p index-bank "
                                            f"{bank}`")
        elif importlib.util.find_spec("faiss") is None:
            problems.add(f"{where}.search", "an index search needs FAISS, which is not installed: pip install "
                                            "'kaggle_i2p[index]' (faiss-cpu), or use search: exact")
    return search, numbers.get("nprobe"), numbers.get("candidates")


def _parse_regressor_output(raw: Mapping, label: str, ctx: ParseContext) -> dict:
    if "retrieval" in raw:
        ctx.problems.add(f"{label}.retrieval", "only for kind: retrieval")
    return {"head": _parse_head(raw.get("head", {"type": "linear"}), f"{label}.head", ctx.problems)}


def _parse_retrieval_output(raw: Mapping, label: str, ctx: ParseContext) -> dict:
    if "head" in raw:
        ctx.problems.add(f"{label}.head", "a retrieval tower has no head: its scores select bank rows")
    if "retrieval" not in raw:
        ctx.problems.add(f"{label}.retrieval", "is required")
        return {"retrieval": None}
    return {"retrieval": _parse_retrieval(raw["retrieval"], f"{label}.retrieval", ctx)}


def _parse_network(raw: Mapping, name: str, label: str, ctx: ParseContext, cls: type[NetworkSpec],
                   parse_output: Callable[[Mapping, str, ParseContext], dict]) -> NetworkSpec | None:
    """The fields every network tower has, then its kind's own section (`parse_output`)."""
    problems, before = ctx.problems, ctx.problems.mark()
    problems.unknown_keys(raw, NETWORK_KEYS, label)
    for key in ("library", "arch", *(("checkpoint",) if ctx.needs_checkpoint else ()), "image", "weight"):
        if key not in raw:
            problems.add(f"{label}.{key}", "is required")
    output = parse_output(raw, label, ctx)

    library = raw.get("library")
    if "library" in raw and library not in LIBRARIES:
        problems.add(f"{label}.library", f"{library!r} is not one of {', '.join(LIBRARIES)}")
    arch = raw.get("arch")
    if "arch" in raw and (not isinstance(arch, str) or not arch):
        problems.add(f"{label}.arch", "must be a model name (timm or open_clip), e.g. eva02_large_patch14_clip_336")
    elif isinstance(arch, str) and arch.endswith(".json"):
        if library != "open_clip":
            problems.add(f"{label}.arch", "a .json model config is only supported for library: open_clip")
        else:
            resolved = resolve_file(arch, ctx.base_dir, f"{label}.arch", problems, "open_clip model config")
            arch = str(resolved) if resolved else arch

    checkpoint = _parse_checkpoint(raw, label, ctx)
    sha256 = raw.get("sha256")
    if isinstance(sha256, (int, float)) and not isinstance(sha256, bool):
        problems.add(f"{label}.sha256", "YAML read this unquoted value as a number (an all-digit or exponent-like "
                                        "hash); put the 64 hex digits in quotes: sha256: \"...\"")
    elif sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha256)):
        problems.add(f"{label}.sha256", "must be 64 hex digits (`sha256sum FILE`), or left out")
    native = raw.get("native_resolution")
    if native is not None and not (is_int(native) and MIN_RESOLUTION <= native <= MAX_RESOLUTION):
        problems.add(f"{label}.native_resolution", f"{native!r} must be the integer image size the checkpoint's "
                                                   "position embeddings were trained at, or left out")
    weight = _parse_weight(raw, label, problems)
    precision = raw.get("precision", "auto")
    if precision not in PRECISIONS:
        problems.add(f"{label}.precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    compile_views = raw.get("compile", False)
    if not isinstance(compile_views, bool):
        problems.add(f"{label}.compile", f"{compile_views!r} must be true or false (torch.compile each resolution)")
    image = _parse_image(raw.get("image"), f"{label}.image", problems)
    dim_weights, dim_weights_path = _parse_dim_weights(raw, label, ctx)
    if problems.blocking_since(before):
        return None
    return cls(name=name, weight=weight, dim_weights=dim_weights, dim_weights_path=dim_weights_path,
               library=library, arch=arch, checkpoint=checkpoint, image=image, sha256=sha256,
               native_resolution=native, precision=precision, compile=compile_views, **output)


def _parse_checkpoint(raw: Mapping, label: str, ctx: ParseContext) -> Path | None:
    if "checkpoint" not in raw:
        return None
    raw_ckpt = raw["checkpoint"]
    if isinstance(raw_ckpt, str) and not raw_ckpt.lower().endswith(CHECKPOINT_SUFFIXES):
        ctx.problems.add(f"{label}.checkpoint", f"{raw_ckpt!r} must end in one of {', '.join(CHECKPOINT_SUFFIXES)}")
        return None
    if ctx.check_files:
        return resolve_file(raw_ckpt, ctx.base_dir, f"{label}.checkpoint", ctx.problems, "tower weights")
    if not isinstance(raw_ckpt, str) or not raw_ckpt.strip():
        ctx.problems.add(f"{label}.checkpoint", "must be a path string to the tower weights")
        return None
    try:
        return expand_path(raw_ckpt, ctx.base_dir)
    except KeyError:
        return Path(raw_ckpt)  # not checked here: the variable may be set where the files are


# The tower kinds: each parses its own entry into its own spec class.
TOWER_KINDS: dict[str, Callable[[Mapping, str, str, ParseContext], TowerSpec | None]] = {
    RegressorSpec.kind: lambda raw, name, label, ctx: _parse_network(raw, name, label, ctx, RegressorSpec,
                                                                     _parse_regressor_output),
    RetrievalSpec.kind: lambda raw, name, label, ctx: _parse_network(raw, name, label, ctx, RetrievalSpec,
                                                                     _parse_retrieval_output),
    PriorSpec.kind: _parse_prior,
}
KINDS: tuple[str, ...] = tuple(TOWER_KINDS)


def parse_tower(raw: Any, index: int, ctx: ParseContext, label: str | None = None) -> TowerSpec | None:
    """One manifest tower entry as its kind's spec; None (with the problems added to `ctx`) when it has any problem."""
    if not isinstance(raw, Mapping):
        ctx.problems.add(label or f"towers[{index}]", "must be a mapping (name, library, arch, checkpoint, head, "
                                                      "image, weight)")
        return None
    name = raw.get("name")
    label = label or tower_label(index, name)
    named = isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.\-]+", name or "")
    if not named:
        ctx.problems.add(f"{label}.name", "is required: letters, digits, '_', '-', '.' (it names the tower in logs "
                                          "and caches)")
    kind = raw.get("kind", RegressorSpec.kind)
    if kind not in TOWER_KINDS:
        ctx.problems.add(f"{label}.kind", f"{kind!r} is not one of {', '.join(KINDS)}")
        return None
    spec = TOWER_KINDS[kind](raw, str(name), label, ctx)
    return spec if named else None


def load_fallback(path: Path, embedding_dim: int) -> np.ndarray:
    """Load the fallback vector (.npy), check it, and return it L2-normalised as float32."""
    vec = np.load(path, allow_pickle=False)
    vec = np.asarray(vec, dtype=np.float64).reshape(-1)
    if vec.shape != (embedding_dim,):
        raise ValueError(f"has shape {vec.shape}, expected ({embedding_dim},)")
    if not np.isfinite(vec).all():
        raise ValueError("contains NaN or inf")
    norm = np.linalg.norm(vec)
    if norm < 1e-6:
        raise ValueError("is (almost) all zeros; use a mean prompt embedding, never zeros")
    return (vec / norm).astype(np.float32)


def parse_manifest(data: Any, path: str | Path, check_files: bool = True) -> Manifest:
    """Validate an already-parsed manifest mapping; `path` anchors relative paths and names the file in errors."""
    path = Path(path)
    base_dir = path.resolve().parent
    problems = Problems()
    if not isinstance(data, Mapping):
        raise ManifestError(path, ["the file must hold a mapping with embedding_dim, fallback and towers"])
    problems.unknown_keys(data, TOP_KEYS, what="top-level key")

    embedding_dim = data.get("embedding_dim", DEFAULT_EMBEDDING_DIM)
    if not is_int(embedding_dim) or embedding_dim <= 0:
        problems.add("embedding_dim", f"{embedding_dim!r} must be a positive integer (384 for all-MiniLM-L6-v2)")
        embedding_dim = DEFAULT_EMBEDDING_DIM

    fallback, fallback_path = None, None
    if "fallback" not in data:
        problems.add("fallback", "is required: a .npy unit vector (e.g. the mean prompt embedding) written for "
                                 "images that cannot be read")
    else:
        fallback_path = resolve_file(data["fallback"], base_dir, "fallback", problems, "fallback vector (.npy)")
        if fallback_path is not None:
            try:
                fallback = load_fallback(fallback_path, embedding_dim)
            except (ValueError, OSError) as err:
                problems.add("fallback", f"{fallback_path} {err}")

    towers_raw = data.get("towers")
    if not isinstance(towers_raw, list) or not towers_raw:
        problems.add("towers", "must be a non-empty list of towers")
        towers_raw = []
    ctx = ParseContext(base_dir, problems, check_files, embedding_dim)
    clean = [(index, spec) for index, raw in enumerate(towers_raw)
             if (spec := parse_tower(raw, index, ctx)) is not None]

    entries = [raw for raw in towers_raw if isinstance(raw, Mapping)]
    seen: dict[str, int] = {}
    for index, raw in enumerate(towers_raw):
        name = raw.get("name") if isinstance(raw, Mapping) else None
        if isinstance(name, str) and name in seen:
            problems.add(f"{tower_label(index, name)}.name",
                         f"duplicates towers[{seen[name]}]; every tower needs its own name")
        if isinstance(name, str):
            seen.setdefault(name, index)
    weights = [raw.get("weight") for raw in entries]
    if entries and all(is_number(w) for w in weights) and sum(max(w, 0.0) for w in weights) <= 0:
        problems.add("towers[*].weight", "all weights are zero; give at least one tower a positive weight")

    if problems.items:
        raise ManifestError(path, problems.items, clean, embedding_dim)
    return Manifest(path=path, embedding_dim=embedding_dim, fallback_path=fallback_path, fallback=fallback,
                    towers=tuple(spec for _, spec in clean))


# Named manifests (`demo`) resolve to a file made on first use; the package registers its builders at import.
NAMED_MANIFESTS: dict[str, Callable[[], Path]] = {}


def register_named_manifest(name: str, build: Callable[[], Path]) -> None:
    """Let `name` stand for the manifest file that `build()` returns (made on first use)."""
    NAMED_MANIFESTS[name] = build


def resolve_manifest(manifest: str | Path) -> Path:
    """A manifest path; a registered name (`demo`) is built on first use and its file returned."""
    builder = NAMED_MANIFESTS.get(str(manifest))
    return Path(builder()) if builder is not None else Path(manifest)


def as_manifest(manifest: str | Path | Manifest) -> Manifest:
    """A Manifest as it is, or the manifest file at that path (or of that name, e.g. `demo`), loaded and validated."""
    return manifest if isinstance(manifest, Manifest) else load_manifest(manifest)


def _rebase(raw: str, source_dir: Path, out_dir: Path) -> str:
    """A relative path that points at the same file from `out_dir`; absolute and `${VAR}` paths stay as they are."""
    if "${" in raw or Path(raw).is_absolute() or source_dir.resolve() == out_dir.resolve():
        return raw
    return os.path.relpath(source_dir / raw, out_dir)


def rebase_manifest_paths(data: dict, source_dir: Path, out_dir: Path) -> dict:
    """Manifest data as written (`${VAR}` paths kept) with every relative path field (fallback; per tower
    checkpoint, dim_weights, a .json arch, retrieval.bank, a prior's vector) rewritten to point at the same files
    from `out_dir`. Modifies and returns `data`."""
    def move(holder: dict, key: str) -> None:
        if isinstance(holder.get(key), str):
            holder[key] = _rebase(holder[key], Path(source_dir), Path(out_dir))

    move(data, "fallback")
    for tower in data.get("towers") or []:
        if not isinstance(tower, dict):
            continue
        for key in ("checkpoint", "dim_weights", "vector"):
            move(tower, key)
        if isinstance(tower.get("arch"), str) and tower["arch"].endswith(".json"):
            move(tower, "arch")
        if isinstance(tower.get("retrieval"), dict):
            move(tower["retrieval"], "bank")
    return data


def write_manifest(data: Mapping, path: str | Path, *, check_files: bool = True, header: str = "") -> Manifest:
    """The one writer of manifest files: validate `data` as it will be read from `path` (relative paths resolve
    against its folder), then write it atomically; a manifest that would not load is never written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # a relative `../x` resolves only through an existing folder
    manifest = parse_manifest(data, path, check_files=check_files)
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(header)
        yaml.safe_dump(_plain(data), handle, sort_keys=False, default_flow_style=None)
    return manifest


def save_manifest(manifest: Manifest, path: str | Path, *, header: str = "") -> Manifest:
    """Write a loaded (or edited) Manifest to `path`, every path relative to its folder; validated, then atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_manifest(manifest.to_dict(path.resolve().parent), path, header=header)


def _plain(value: Any) -> Any:
    """YAML-safe data: tuples as lists, mappings as dicts, all the way down."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_manifest(path: str | Path, check_files: bool = True) -> Manifest:
    """Read and validate a manifest YAML file (or a named one, e.g. `demo`); raises ManifestError listing every
    problem."""
    path = resolve_manifest(path)
    return parse_manifest(read_yaml(path, ManifestError, "manifest file not found", "; pass --manifest PATH"), path,
                          check_files=check_files)

