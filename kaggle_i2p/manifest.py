"""The weights manifest: which towers to run, how to preprocess for each, and how to weight them.

The manifest is data. `load_manifest` parses and validates it completely (schema, paths, weights, the fallback vector)
before any model code runs, and reports every problem at once, each naming the tower, the field and the fix.
Architecture-level checks (does the arch exist, do the resolutions fit it) live in `towers.check_architectures`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .atomic import atomic_open
from .errors import I2PError

LIBRARIES = ("timm", "open_clip")
KINDS = ("regressor", "retrieval", "prior")
SCORES = ("logits", "embedding")
HEAD_TYPES = ("linear", "mlp")
HEAD_NORMS = ("batchnorm", "layernorm", "none")
HEAD_ACTIVATIONS = ("relu", "gelu")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
RESIZE_MODES = ("squash", "shorter_side_center_crop")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")

TOP_KEYS = {"embedding_dim", "fallback", "towers"}
TOWER_KEYS = {"name", "kind", "library", "arch", "checkpoint", "sha256", "native_resolution", "head", "image",
              "weight", "precision", "dim_weights", "retrieval"}
PRIOR_KEYS = {"name", "kind", "vector", "weight", "dim_weights"}
RETRIEVAL_KEYS = {"bank", "k", "temperature", "score"}
HEAD_KEYS = {"type", "hidden", "norm", "activation"}
IMAGE_KEYS = {"mean", "std", "interpolation", "resize", "resolutions", "hflip", "view_weights"}

MIN_RESOLUTION, MAX_RESOLUTION = 32, 1024
DEFAULT_RETRIEVAL_K, DEFAULT_RETRIEVAL_TEMPERATURE = 10, 1.0  # a retrieval tower's soft top-k when not given


class ManifestError(I2PError, ValueError):
    """A manifest that cannot be used; the message lists every problem found, one per line."""

    def __init__(self, path: str | Path, problems: list[str], clean_towers: list | None = None,
                 embedding_dim: int = 384):
        self.path = str(path)
        self.problems = problems
        self.clean_towers: list[tuple[int, TowerSpec]] = clean_towers or []  # parsed without a problem of their own
        self.embedding_dim = embedding_dim
        super().__init__(f"{self.path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class HeadSpec:
    """The regression head on top of the backbone's pooled features: `linear`, or `mlp` (Linear-norm-act-Linear)."""

    type: str = "linear"
    hidden: int | None = None
    norm: str = "batchnorm"
    activation: str = "relu"


@dataclass(frozen=True)
class ImageSpec:
    """How a decoded uint8 image becomes this tower's input: resize, normalise, TTA resolutions and flip."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize: str
    resolutions: tuple[int, ...]
    hflip: bool = False
    view_weights: dict[str, float] | None = None  # by view name (r336, r336_flip); None = equal

    @property
    def views(self) -> list[tuple[str, int, bool]]:
        """(name, resolution, flip) of every TTA view, in order."""
        return [(f"r{r}_flip" if flip else f"r{r}", r, flip) for r in self.resolutions
                for flip in ((False, True) if self.hflip else (False,))]

    @property
    def n_views(self) -> int:
        return len(self.views)

    def view_weight_list(self) -> list[float]:
        """One weight per view, in `views` order (equal unless `view_weights` says otherwise)."""
        return [1.0 if self.view_weights is None else self.view_weights[name] for name, _, _ in self.views]


@dataclass(frozen=True)
class RetrievalSpec:
    """A retrieval tower's bank and how its scores become an embedding (soft top-k)."""

    bank: Path
    k: int
    temperature: float
    score: str  # logits: a classifier whose classes are the bank's rows; embedding: queries in the keys' space
    rows: int
    key_dim: int | None


@dataclass(frozen=True)
class TowerSpec:
    """One tower of the ensemble, as the manifest declares it (paths already resolved).

    kind `regressor`: an image model with a head regressing the prompt embedding. `retrieval`: an image model whose
    scores (class logits, or an embedding) select texts of a bank. `prior`: a constant vector, e.g. the mean prompt.
    """

    name: str
    library: str
    arch: str
    checkpoint: Path
    head: HeadSpec
    image: ImageSpec | None
    weight: float
    sha256: str | None = None
    native_resolution: int | None = None
    precision: str = "auto"
    dim_weights: np.ndarray | None = field(default=None, repr=False, compare=False)  # per-dimension multipliers
    kind: str = "regressor"
    retrieval: RetrievalSpec | None = None
    prior: np.ndarray | None = field(default=None, repr=False, compare=False)  # a prior tower's unit vector

    @property
    def views(self) -> list[tuple[str, int, bool]]:
        """(name, resolution, flip) of every TTA view; a prior has one constant view."""
        return [("prior", 0, False)] if self.kind == "prior" else self.image.views

    @property
    def n_views(self) -> int:
        return len(self.views)

    def view_weight_list(self) -> list[float]:
        return [1.0] if self.kind == "prior" else self.image.view_weight_list()


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


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_path(raw: str, base_dir: Path) -> Path:
    """Expand `${VAR}` / `${VAR:-default}` from the environment and resolve relative paths against `base_dir`."""

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is None:
            if default is None:
                raise KeyError(name)
            return default
        return value

    path = Path(_VAR.sub(substitute, raw)).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base_dir / path))  # `a/../b` names b once


def tower_label(index: int, name: object) -> str:
    """How every problem names a tower: `tower 'vit' (towers[2])`, or `towers[2]` when it has no usable name."""
    return f"tower {name!r} (towers[{index}])" if isinstance(name, str) and name else f"towers[{index}]"


class _Problems:
    """Collects problems so that one validation pass reports all of them."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _resolve_file(raw: Any, base_dir: Path, where: str, problems: _Problems, what: str) -> Path | None:
    if not isinstance(raw, str) or not raw.strip():
        problems.add(where, f"must be a path string to the {what}")
        return None
    try:
        path = expand_path(raw, base_dir)
    except KeyError as err:
        problems.add(where, f"environment variable {err.args[0]} is not set (in {raw!r}); export it, "
                            f"or write ${{{err.args[0]}:-default}}")
        return None
    if not path.is_file():
        origin = f"expanded from {raw!r}; " if "${" in raw else ""
        problems.add(where, f"file not found: {path} ({origin}relative paths resolve against the manifest's folder "
                            f"{base_dir}); attach the dataset that holds it or fix the path")
        return None
    return path


def _parse_head(raw: Any, where: str, problems: _Problems) -> HeadSpec:
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, Mapping):
        problems.add(where, "must be a mapping like {type: linear} or {type: mlp, hidden: 1024}")
        return HeadSpec()
    for key in sorted(set(raw) - HEAD_KEYS):
        problems.add(f"{where}.{key}", f"unknown key; allowed: {', '.join(sorted(HEAD_KEYS))}")
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


def _parse_triplet(raw: Any, where: str, problems: _Problems, positive: bool) -> tuple[float, float, float]:
    if isinstance(raw, (list, tuple)) and len(raw) == 3 and all(_is_number(v) for v in raw):
        if positive and any(v <= 0 for v in raw):
            problems.add(where, f"{list(raw)} must be three positive numbers")
        return tuple(float(v) for v in raw)  # type: ignore[return-value]
    problems.add(where, "must be a list of three numbers (per RGB channel, on the 0-1 scale), "
                        "e.g. [0.48145466, 0.4578275, 0.40821073] for OpenAI CLIP")
    return (0.0, 0.0, 0.0) if not positive else (1.0, 1.0, 1.0)


def _parse_image(raw: Any, where: str, problems: _Problems) -> ImageSpec:
    if not isinstance(raw, Mapping):
        problems.add(where, "must be a mapping with mean, std, interpolation, resize, resolutions (and hflip)")
        raw = {}
    for key in sorted(set(raw) - IMAGE_KEYS):
        problems.add(f"{where}.{key}", f"unknown key; allowed: {', '.join(sorted(IMAGE_KEYS))}")
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
    names = [name for name, _, _ in spec.views]
    if not isinstance(raw_view_weights, Mapping):
        problems.add(f"{where}.view_weights", f"must map view names ({', '.join(names)}) to weights >= 0")
        return spec
    for name in sorted(set(raw_view_weights) - set(names)):
        problems.add(f"{where}.view_weights.{name}", f"is not a view of this tower; its views are {', '.join(names)}")
    for name in names:
        if not _is_number(raw_view_weights.get(name)) or raw_view_weights[name] < 0:
            problems.add(f"{where}.view_weights.{name}", "needs a weight >= 0 for every view")
    values = [raw_view_weights.get(n) for n in names]
    if all(_is_number(v) and v >= 0 for v in values):
        if sum(values) <= 0:
            problems.add(f"{where}.view_weights", "are all zero; give at least one view a positive weight")
        return replace(spec, view_weights={n: float(v) for n, v in zip(names, values, strict=True)})
    return spec


def _parse_dim_weights(raw: Any, base_dir: Path, where: str, problems: _Problems, dim: int) -> np.ndarray | None:
    path = _resolve_file(raw, base_dir, where, problems, "per-dimension weights (.npy)")
    if path is None:
        return None
    try:
        weights = np.load(path, allow_pickle=False).astype(np.float32).reshape(-1)
    except (OSError, ValueError) as err:
        problems.add(where, f"cannot read {path}: {err}")
        return None
    if weights.shape != (dim,) or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        problems.add(where, f"{path} must hold {dim} finite weights >= 0, not all zero (kaggle-i2p tune --per-dim)")
        return None
    return weights


def _parse_tower(raw: Any, index: int, base_dir: Path, problems: _Problems, check_files: bool,
                 embedding_dim: int = 384, label: str | None = None) -> TowerSpec | None:
    if not isinstance(raw, Mapping):
        problems.add(label or f"towers[{index}]", "must be a mapping (name, library, arch, checkpoint, head, image, "
                                                  "weight)")
        return None
    name = raw.get("name")
    if label is None:
        label = tower_label(index, name)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name or ""):
        problems.add(f"{label}.name", "is required: letters, digits, '_', '-', '.' (it names the tower in logs "
                                      "and caches)")
    kind = raw.get("kind", "regressor")
    if kind not in KINDS:
        problems.add(f"{label}.kind", f"{kind!r} is not one of {', '.join(KINDS)}")
        return None
    if kind == "prior":
        return _parse_prior(raw, str(name), label, base_dir, problems, embedding_dim)
    for key in sorted(set(raw) - TOWER_KEYS):
        problems.add(f"{label}.{key}", f"unknown key; allowed: {', '.join(sorted(TOWER_KEYS))}")
    for key in ("library", "arch", "checkpoint", "image", "weight", *(("retrieval",) if kind == "retrieval" else ())):
        if key not in raw:
            problems.add(f"{label}.{key}", "is required")
    retrieval = None
    if kind == "retrieval":
        if "head" in raw:
            problems.add(f"{label}.head", "a retrieval tower has no head: its scores select bank rows")
        if "retrieval" in raw:
            retrieval = _parse_retrieval(raw["retrieval"], f"{label}.retrieval", base_dir, problems, embedding_dim)
    elif "retrieval" in raw:
        problems.add(f"{label}.retrieval", "only for kind: retrieval")

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
            resolved = _resolve_file(arch, base_dir, f"{label}.arch", problems, "open_clip model config")
            arch = str(resolved) if resolved else arch

    checkpoint: Path | None = None
    if "checkpoint" in raw:
        raw_ckpt = raw["checkpoint"]
        if isinstance(raw_ckpt, str) and not raw_ckpt.lower().endswith(CHECKPOINT_SUFFIXES):
            problems.add(f"{label}.checkpoint", f"{raw_ckpt!r} must end in one of {', '.join(CHECKPOINT_SUFFIXES)}")
        elif check_files:
            checkpoint = _resolve_file(raw_ckpt, base_dir, f"{label}.checkpoint", problems, "tower weights")
        elif isinstance(raw_ckpt, str):
            try:
                checkpoint = expand_path(raw_ckpt, base_dir)
            except KeyError:
                checkpoint = Path(raw_ckpt)

    sha256 = raw.get("sha256")
    if isinstance(sha256, (int, float)) and not isinstance(sha256, bool):
        problems.add(f"{label}.sha256", "YAML read this unquoted value as a number (an all-digit or exponent-like "
                                        "hash); put the 64 hex digits in quotes: sha256: \"...\"")
        sha256 = None
    elif sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha256)):
        problems.add(f"{label}.sha256", "must be 64 hex digits (`sha256sum FILE`), or left out")
        sha256 = None
    native = raw.get("native_resolution")
    if native is not None and not (isinstance(native, int) and not isinstance(native, bool)
                                   and MIN_RESOLUTION <= native <= MAX_RESOLUTION):
        problems.add(f"{label}.native_resolution", f"{native!r} must be the integer image size the checkpoint's "
                                                   "position embeddings were trained at, or left out")
        native = None

    weight = _parse_weight(raw, label, problems)
    precision = raw.get("precision", "auto")
    if precision not in PRECISIONS:
        problems.add(f"{label}.precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")

    head = _parse_head(raw.get("head", {"type": "linear"}), f"{label}.head", problems)
    image = _parse_image(raw.get("image"), f"{label}.image", problems)
    return TowerSpec(name=str(name), library=str(library), arch=str(arch), checkpoint=checkpoint or Path(),
                     head=head, image=image, weight=weight, sha256=sha256, native_resolution=native,
                     precision=str(precision), dim_weights=_optional_dim_weights(raw, label, base_dir, problems,
                                                                                   embedding_dim),
                     kind=kind, retrieval=retrieval)


def _parse_weight(raw: Mapping, label: str, problems: _Problems) -> float:
    weight = raw.get("weight")
    if "weight" in raw and not _is_number(weight):
        problems.add(f"{label}.weight", f"{weight!r} must be a number >= 0")
        return 0.0
    if _is_number(weight) and weight < 0:
        problems.add(f"{label}.weight", f"{weight} is negative; ensemble weights must be >= 0 "
                                        "(use 0 to switch a tower off)")
    return float(weight) if _is_number(weight) else 0.0


def _optional_dim_weights(raw: Mapping, label: str, base_dir: Path, problems: _Problems,
                          embedding_dim: int) -> np.ndarray | None:
    if raw.get("dim_weights") is None:
        return None
    return _parse_dim_weights(raw["dim_weights"], base_dir, f"{label}.dim_weights", problems, embedding_dim)


def _parse_prior(raw: Mapping, name: str, label: str, base_dir: Path, problems: _Problems,
                 embedding_dim: int) -> TowerSpec:
    """A constant tower: the same unit vector (e.g. the mean prompt embedding) for every image."""
    for key in sorted(set(raw) - PRIOR_KEYS):
        problems.add(f"{label}.{key}", f"unknown key for a prior tower; allowed: {', '.join(sorted(PRIOR_KEYS))}")
    for key in ("vector", "weight"):
        if key not in raw:
            problems.add(f"{label}.{key}", "is required")
    vector = None
    if "vector" in raw:
        path = _resolve_file(raw["vector"], base_dir, f"{label}.vector", problems, "prior vector (.npy)")
        if path is not None:
            try:
                vector = load_fallback(path, embedding_dim)
            except (ValueError, OSError) as err:
                problems.add(f"{label}.vector", f"{path} {err}")
    return TowerSpec(name=name, library="", arch="", checkpoint=Path(), head=HeadSpec(), image=None,
                     weight=_parse_weight(raw, label, problems),
                     dim_weights=_optional_dim_weights(raw, label, base_dir, problems, embedding_dim),
                     kind="prior", prior=vector)


def _parse_retrieval(raw: Any, where: str, base_dir: Path, problems: _Problems,
                     embedding_dim: int) -> RetrievalSpec | None:
    if not isinstance(raw, Mapping):
        problems.add(where, "must be a mapping with bank, k, temperature, score")
        return None
    for key in sorted(set(raw) - RETRIEVAL_KEYS):
        problems.add(f"{where}.{key}", f"unknown key; allowed: {', '.join(sorted(RETRIEVAL_KEYS))}")
    k, temperature = raw.get("k", DEFAULT_RETRIEVAL_K), raw.get("temperature", DEFAULT_RETRIEVAL_TEMPERATURE)
    score = raw.get("score", "logits")
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        problems.add(f"{where}.k", f"{k!r} must be an integer >= 1 (texts averaged per image)")
    if not (_is_number(temperature) and temperature > 0):
        problems.add(f"{where}.temperature", f"{temperature!r} must be a number > 0")
    if score not in SCORES:
        problems.add(f"{where}.score", f"{score!r} is not one of {', '.join(SCORES)}")
    raw_bank = raw.get("bank")
    if not isinstance(raw_bank, str):
        problems.add(f"{where}.bank", "is required: the folder written by `kaggle-i2p build-bank`")
        return None
    try:
        bank = expand_path(raw_bank, base_dir)
    except KeyError as err:
        problems.add(f"{where}.bank", f"environment variable {err.args[0]} is not set (in {raw_bank!r})")
        return None
    if not (bank / "targets.npy").is_file():
        problems.add(f"{where}.bank", f"{bank} is not a bank folder (no targets.npy); build it with "
                                      "`kaggle-i2p build-bank`")
        return None
    targets = np.load(bank / "targets.npy", mmap_mode="r")
    keys = np.load(bank / "keys.npy", mmap_mode="r") if (bank / "keys.npy").is_file() else None
    if targets.ndim != 2 or targets.shape[1] != embedding_dim:
        problems.add(f"{where}.bank", f"{bank}/targets.npy has shape {targets.shape}; expected (rows, {embedding_dim})")
    if score == "embedding" and keys is None:
        problems.add(f"{where}.score", f"embedding scores need {bank}/keys.npy (a bank built with keys)")
    return RetrievalSpec(bank=bank, k=int(k) if isinstance(k, int) else DEFAULT_RETRIEVAL_K,
                         temperature=float(temperature) if _is_number(temperature) else DEFAULT_RETRIEVAL_TEMPERATURE,
                         score=str(score),
                         rows=int(targets.shape[0]), key_dim=None if keys is None else int(keys.shape[1]))


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
    problems = _Problems()
    if not isinstance(data, Mapping):
        raise ManifestError(path, ["the file must hold a mapping with embedding_dim, fallback and towers"])
    for key in sorted(set(data) - TOP_KEYS):
        problems.add(key, f"unknown top-level key; allowed: {', '.join(sorted(TOP_KEYS))}")

    embedding_dim = data.get("embedding_dim", 384)
    if not isinstance(embedding_dim, int) or isinstance(embedding_dim, bool) or embedding_dim <= 0:
        problems.add("embedding_dim", f"{embedding_dim!r} must be a positive integer (384 for all-MiniLM-L6-v2)")
        embedding_dim = 384

    fallback = np.zeros(embedding_dim, dtype=np.float32)
    fallback_path = Path()
    if "fallback" not in data:
        problems.add("fallback", "is required: a .npy unit vector (e.g. the mean prompt embedding) written for "
                                 "images that cannot be read")
    else:
        resolved = _resolve_file(data["fallback"], base_dir, "fallback", problems, "fallback vector (.npy)")
        if resolved is not None:
            fallback_path = resolved
            try:
                fallback = load_fallback(resolved, embedding_dim)
            except (ValueError, OSError) as err:
                problems.add("fallback", f"{resolved} {err}")

    towers_raw = data.get("towers")
    towers: list[TowerSpec] = []
    if not isinstance(towers_raw, list) or not towers_raw:
        problems.add("towers", "must be a non-empty list of towers")
        towers_raw = []
    clean: list[tuple[int, TowerSpec]] = []
    for index, raw in enumerate(towers_raw):
        before = len(problems.items)
        spec = _parse_tower(raw, index, base_dir, problems, check_files, embedding_dim)
        if spec is not None:
            towers.append(spec)
            if len(problems.items) == before:
                clean.append((index, spec))

    seen: dict[str, int] = {}
    for index, spec in enumerate(towers):
        if spec.name in seen:
            problems.add(f"{tower_label(index, spec.name)}.name",
                         f"duplicates towers[{seen[spec.name]}]; every tower needs its own name")
        seen.setdefault(spec.name, index)
    if towers and all(_is_number(t.weight) for t in towers) and sum(max(t.weight, 0.0) for t in towers) <= 0:
        problems.add("towers[*].weight", "all weights are zero; give at least one tower a positive weight")

    if problems.items:
        raise ManifestError(path, problems.items, clean, embedding_dim)
    return Manifest(path=path, embedding_dim=embedding_dim, fallback_path=fallback_path, fallback=fallback,
                    towers=tuple(towers))


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


def read_yaml(path: Path, error: type[ManifestError] = ManifestError, missing: str = "manifest file not found",
              hint: str = "; pass --manifest PATH") -> Any:
    """A YAML file's data; a missing or unparsable file raises `error` naming it."""
    if not path.is_file():
        raise error(path, [f"{missing}: {path.resolve()}{hint}"])
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise error(path, [f"is not valid YAML: {err}"]) from err


def _rebase(raw: str, source_dir: Path, out_dir: Path) -> str:
    """A relative path that points at the same file from `out_dir`; absolute and `${VAR}` paths stay as they are."""
    if "${" in raw or Path(raw).is_absolute() or source_dir.resolve() == out_dir.resolve():
        return raw
    return os.path.relpath(source_dir / raw, out_dir)


def rebase_manifest_paths(data: dict, source_dir: Path, out_dir: Path) -> dict:
    """Manifest data with every path field (fallback; per tower checkpoint, dim_weights, a .json arch,
    retrieval.bank, a prior's vector) rewritten to point at the same files from `out_dir`. Modifies and returns
    `data`."""
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
    return parse_manifest(read_yaml(path), path, check_files=check_files)
