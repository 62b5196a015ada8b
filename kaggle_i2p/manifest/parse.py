"""Reading a manifest: `load_manifest` parses and validates a file completely (schema, paths, weights, the fallback
vector) before any model code runs, reporting every problem at once, each naming the tower, the field and the fix.

The parts every tower kind shares live here (`parse_network`, `parse_image`, `parse_weight`, `parse_dim_weights`);
each kind's own section is parsed by its module in `kaggle_i2p.kinds`, found through the kind registry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..core.registry import KINDS, LIBRARIES
from ..core.resources import NAMED_MANIFESTS
from ..core.validate import Problems, expand_path, expanded_path, is_int, is_number, read_yaml, resolve_file
from .fields import checked_fields, entry_keys
from .schema import (
    CHECKPOINT_SUFFIXES,
    DEFAULT_EMBEDDING_DIM,
    DEFAULT_KIND,
    TOP_KEYS,
    ImageSpec,
    KeyRules,
    Manifest,
    ManifestError,
    NetworkSpec,
    Normalisation,
    ParseContext,
    TowerSpec,
    arch_is_path,
    kind_of,
    tower_label,
)

IMAGE_KEYS = entry_keys(ImageSpec)


def _parse_norms(raw: Mapping, where: str, problems: Problems) -> tuple | None:
    """`norms: [{mean, std}, ...]`: every normalisation, each a TTA view (instead of the section's mean/std)."""
    if "mean" in raw or "std" in raw:
        problems.add(f"{where}.norms", "lists every normalisation, the first included: leave mean and std out")
    value, before = raw["norms"], problems.mark()
    if not isinstance(value, list) or not value:
        problems.add(f"{where}.norms", f"{value!r} must be a list of {{mean: [r, g, b], std: [r, g, b]}}, one per "
                                       "normalisation, e.g. CLIP's and ImageNet's")
        return None
    norms = [checked_fields(Normalisation, norm, f"{where}.norms[{i}]", problems) for i, norm in enumerate(value)]
    if problems.blocking_since(before):
        return None
    pairs = [(norm["mean"], norm["std"]) for norm in norms]
    if len(set(pairs)) < len(pairs):
        problems.add(f"{where}.norms", "lists a normalisation twice; each view once")
    return tuple(pairs)


def parse_image(raw: Any, where: str, problems: Problems) -> ImageSpec | None:
    """An entry's `image:` section, checked from ImageSpec's marks, then its `norms` and `view_weights`; None when
    it has a problem."""
    before, has_norms = problems.mark(), isinstance(raw, Mapping) and "norms" in raw
    norms = _parse_norms(raw, where, problems) if has_norms else None
    own = ("norms", "view_weights", *(("mean", "std") if has_norms else ()))
    values = checked_fields(ImageSpec, raw, where, problems, skip=own)
    if problems.blocking_since(before):
        return None
    if norms:
        values["mean"], values["std"] = norms[0]
    spec = ImageSpec(**values, norms=norms)
    weights = _parse_view_weights(raw.get("view_weights"), [view.name for view in spec.views], where, problems)
    return replace(spec, view_weights=weights) if weights else spec


def _parse_view_weights(raw: Any, names: list[str], where: str, problems: Problems) -> dict[str, float] | None:
    """`view_weights`: a weight >= 0 for every view of the tower, by view name, not all zero (None: equal)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.add(f"{where}.view_weights", f"must map view names ({', '.join(names)}) to weights >= 0")
        return None
    for name in sorted(set(raw) - set(names), key=str):
        problems.add(f"{where}.view_weights.{name}", f"is not a view of this tower; its views are {', '.join(names)}")
    bad = [name for name in names if not is_number(raw.get(name)) or raw[name] < 0]
    for name in bad:
        problems.add(f"{where}.view_weights.{name}", "needs a weight >= 0 for every view")
    if bad:
        return None
    if sum(raw[name] for name in names) <= 0:
        problems.add(f"{where}.view_weights", "are all zero; give at least one view a positive weight")
    return {name: float(raw[name]) for name in names}


def parse_dim_weights(raw: Mapping, label: str, ctx: ParseContext) -> tuple[np.ndarray | None, Path | None]:
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


def parse_weight(raw: Mapping, label: str, problems: Problems) -> float:
    """An entry's ensemble `weight` (a number >= 0), checked by TowerSpec's mark; 0.0 when missing or bad."""
    return checked_fields(TowerSpec, raw, label, problems, only=("weight",), defaults={"weight": 0.0})["weight"]


# what parse_network parses itself (paths, sections, the name); every other field is checked from its marks
NETWORK_OWN = ("name", "dim_weights_path", "image", "checkpoint", "checkpoint_keys")


def parse_network(raw: Mapping, name: str, label: str, ctx: ParseContext, kind: Any,
                  output: Callable[[Mapping, str, ParseContext], dict]) -> NetworkSpec | None:
    """The fields every network tower has (checked from NetworkSpec's marks), then its kind's own section
    (`output`), into `kind.spec`."""
    problems, before = ctx.problems, ctx.problems.mark()
    values = checked_fields(NetworkSpec, raw, label, problems, skip=NETWORK_OWN,
                            allowed=entry_keys(kind.spec) | kind.reported_keys)
    section = output(raw, label, ctx)
    library, arch = values.get("library"), values.get("arch")
    program = library is not None and LIBRARIES.get(library).holds_weights
    for key in (*(("checkpoint",) if ctx.needs_checkpoint and not program else ()), "image"):
        if key not in raw:
            problems.add(f"{label}.{key}", "is required")
    image = parse_image(raw.get("image"), f"{label}.image", problems) if "image" in raw else None
    if arch is not None:
        arch = values["arch"] = _parse_arch_file(arch, library, label, ctx, image.resolutions if image else ())
    checkpoint = parse_checkpoint(raw, label, ctx)
    if values.get("sha256") is not None and checkpoint is None and library is not None and image is not None \
            and arch is not None and len(LIBRARIES.get(library).arch_files(arch, image.resolutions)) > 1:
        problems.add(f"{label}.sha256", "checks one file, and this tower's programs are one per resolution (each "
                                        "one's content is in the cache key): remove it")
    if library is not None:
        for field, problem in LIBRARIES.get(library).option_problems(values["features"], values["backbone"]):
            problems.add(f"{label}.{field}", problem)
    dim_weights, dim_weights_path = parse_dim_weights(raw, label, ctx)
    key_rules = parse_key_rules(raw.get("checkpoint_keys"), f"{label}.checkpoint_keys", problems)
    if problems.blocking_since(before):
        return None
    return kind.spec(name=name, **values, dim_weights=dim_weights, dim_weights_path=dim_weights_path,
                     checkpoint=checkpoint, image=image, checkpoint_keys=key_rules, **section)


def parse_key_rules(raw: Any, where: str, problems: Problems) -> KeyRules | None:
    """`checkpoint_keys: {strip: [prefix, ...], rename: {old: new, ...}, ignore: [prefix, ...], weights: key}`
    (checked from KeyRules' marks), or None."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.add(where, "must be a mapping like {strip: [model.], rename: {fc.: head.}, ignore: [text.]}")
        return None
    return KeyRules(**checked_fields(KeyRules, raw, where, problems))


def _parse_arch_file(arch: str, library: Any, label: str, ctx: ParseContext, resolutions: Sequence[int]) -> str:
    """An `arch` its library reads as a file (a model config, a folder holding one, or a program per resolution),
    resolved against the manifest's folder; a file's suffix under a library that reads no such file is a problem
    naming the libraries that do."""
    if arch_is_path(library, arch):
        lib = LIBRARIES.get(library)
        folder_file = lib.arch_folder_file
        if folder_file and not arch.endswith(lib.arch_file_suffixes):
            try:
                folder = expand_path(arch, ctx.base_dir)
            except KeyError:
                folder = None
            if folder is not None and folder.is_dir():
                arch = str(folder / folder_file)
        what = f"{library} model config ({folder_file} or the folder holding it; nothing is downloaded)" \
            if folder_file else f"{library} model config" if not lib.holds_weights else f"{library} program"
        files = lib.arch_files(arch, resolutions or (0,))
        if len(files) == 1 and files[0] == arch:
            resolved = resolve_file(arch, ctx.base_dir, f"{label}.arch", ctx.problems, what)
            return str(resolved) if resolved else arch
        if Path(files[0]).parent != Path(arch).parent:
            ctx.problems.add(f"{label}.arch", f"{arch!r}: only the file name may vary with the resolution")
            return arch
        found = [resolve_file(f, ctx.base_dir, f"{label}.arch", ctx.problems, f"{what} of one resolution")
                 for f in files]
        return str(found[0].parent / Path(arch).name) if all(found) else arch
    readers = [lib.name for lib in LIBRARIES if lib.arch_file_suffixes and arch.endswith(lib.arch_file_suffixes)]
    if readers:
        suffix = Path(arch).suffix
        ctx.problems.add(f"{label}.arch", f"a {suffix} model config is only supported for library: "
                                          f"{', '.join(readers)}")
    return arch


def parse_checkpoint(raw: Mapping, label: str, ctx: ParseContext) -> Path | tuple[Path, ...] | None:
    """`checkpoint`: a weights file, a save_pretrained/save_model folder, or a list of them merged (a backbone and a
    head saved apart); one resolved path, or a tuple for a list."""
    if "checkpoint" not in raw:
        return None
    value = raw["checkpoint"]
    where = f"{label}.checkpoint"
    if isinstance(value, list):
        if not value:
            ctx.problems.add(where, "an empty list: give the weights file(s), e.g. [backbone.safetensors, head.pth]")
            return None
        parts = [_checkpoint_part(item, f"{where}[{i}]", ctx) for i, item in enumerate(value)]
        return tuple(parts) if all(p is not None for p in parts) else None
    return _checkpoint_part(value, where, ctx)


def _checkpoint_part(raw_ckpt: Any, where: str, ctx: ParseContext) -> Path | None:
    """One file or folder of a checkpoint: a folder is a save_pretrained/save_model folder (its weights found when
    read); a file must have a weights file's suffix."""
    if not isinstance(raw_ckpt, str) or not raw_ckpt.strip():
        ctx.problems.add(where, "must be a path string to the tower weights (a file, a save_pretrained folder, or a "
                                "list of them)")
        return None
    path = expanded_path(raw_ckpt, ctx.base_dir, where, ctx.problems, ctx.check_files)
    if path is None:
        return None
    if path.is_dir():
        return path
    if not raw_ckpt.lower().endswith(CHECKPOINT_SUFFIXES):
        program = {".onnx": "onnx", ".pt2": "export"}.get(Path(raw_ckpt).suffix.lower())
        advice = (f"; it is a program (the model itself, not weights): serve it with `library: {program}` and "
                  f"`arch: {raw_ckpt}`, with a checkpoint only for a head of your own") if program else ""
        ctx.problems.add(where, f"{raw_ckpt!r} must end in one of {', '.join(CHECKPOINT_SUFFIXES)}, or be a "
                                f"save_pretrained folder{advice}")
        return None
    if ctx.check_files:
        return resolve_file(raw_ckpt, ctx.base_dir, where, ctx.problems, "tower weights")
    return path


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
    kind = raw.get("kind", DEFAULT_KIND)
    if not isinstance(kind, str) or kind not in KINDS:
        ctx.problems.add(f"{label}.kind", KINDS.unknown(kind) if isinstance(kind, str) else
                         f"{kind!r} must be one name, one of {', '.join(KINDS.names())}")
        return None
    spec = KINDS.get(kind).parse(raw, str(name), label, ctx)
    return spec if named else None


def parse_entry(entry: Any, embedding_dim: int, path: str | Path, check_files: bool = True) -> TowerSpec:
    """One tower entry parsed alone, as `towers[0]` of a manifest at `path` (paths resolve beside it): how inspect
    and --expect check the entries they propose, with no fallback vector or other tower needed (so at any
    embedding_dim); a tower reading others' outputs is left unresolved. ManifestError on any problem."""
    problems = Problems()
    spec = parse_tower(entry, 0, ParseContext(Path(path).resolve().parent, problems, check_files, embedding_dim))
    if spec is None or problems.items:
        raise ManifestError(path, problems.items)
    return spec


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


def parse_manifest(data: Any, path: str | Path, check_files: bool = True, *, allow_empty: bool = False) -> Manifest:
    """Validate an already-parsed manifest mapping; `path` anchors relative paths and names the file in errors.
    `allow_empty`: a manifest with no towers yet (what `init` writes) is valid to hold and to add towers to; a run
    needs at least one."""
    path = Path(path)
    problems = Problems()
    if not isinstance(data, Mapping):
        raise ManifestError(path, ["the file must hold a mapping with embedding_dim, fallback and towers"])
    problems.unknown_keys(data, TOP_KEYS, what="top-level key")
    embedding_dim = data.get("embedding_dim", DEFAULT_EMBEDDING_DIM)
    if not is_int(embedding_dim) or embedding_dim <= 0:
        problems.add("embedding_dim", f"{embedding_dim!r} must be a positive integer (384 for all-MiniLM-L6-v2)")
        embedding_dim = DEFAULT_EMBEDDING_DIM
    fallback_path, fallback = _parse_fallback(data, path.resolve().parent, embedding_dim, problems)
    towers_raw = data.get("towers")
    if not isinstance(towers_raw, list) or not (towers_raw or allow_empty):
        problems.add("towers", "must be a non-empty list of towers; add one with `kaggle-i2p inspect CHECKPOINT "
                               f"--append {path}`")
        towers_raw = []
    ctx = ParseContext(path.resolve().parent, problems, check_files, embedding_dim)
    clean = [(index, spec) for index, raw in enumerate(towers_raw)
             if (spec := parse_tower(raw, index, ctx)) is not None]
    _check_names_and_weights(towers_raw, problems)
    clean = _resolve_links(clean, embedding_dim, problems)
    if problems.items:
        raise ManifestError(path, problems.items, clean, embedding_dim)
    return Manifest(path=path, embedding_dim=embedding_dim, fallback_path=fallback_path, fallback=fallback,
                    towers=tuple(spec for _, spec in clean))


def _parse_fallback(data: Mapping, base_dir: Path, embedding_dim: int, problems: Problems
                    ) -> tuple[Path | None, np.ndarray | None]:
    """The `fallback` .npy (its path, and its unit vector), checked now: written for images that cannot be read."""
    if "fallback" not in data:
        problems.add("fallback", "is required: a .npy unit vector (e.g. the mean prompt embedding) written for "
                                 "images that cannot be read")
        return None, None
    return parse_vector(data["fallback"], base_dir, "fallback", problems, embedding_dim, "fallback vector (.npy)")


def parse_vector(raw: Any, base_dir: Path, where: str, problems: Problems, embedding_dim: int, what: str
                 ) -> tuple[Path | None, np.ndarray | None]:
    """A .npy unit vector a manifest names (the fallback, a prior tower's): its resolved path and the vector
    (`load_fallback`), or None for what cannot be used, its problem added."""
    path = resolve_file(raw, base_dir, where, problems, what)
    if path is None:
        return None, None
    try:
        return path, load_fallback(path, embedding_dim)
    except (ValueError, OSError) as err:
        problems.add(where, f"{path} {err}")
        return path, None


def _check_names_and_weights(towers_raw: list, problems: Problems) -> None:
    """Every tower its own name; not every weight zero."""
    seen: dict[str, int] = {}
    for index, raw in enumerate(towers_raw):
        name = raw.get("name") if isinstance(raw, Mapping) else None
        if isinstance(name, str) and name in seen:
            problems.add(f"{tower_label(index, name)}.name",
                         f"duplicates towers[{seen[name]}]; every tower needs its own name")
        if isinstance(name, str):
            seen.setdefault(name, index)
    weights = [raw.get("weight") for raw in towers_raw if isinstance(raw, Mapping)]
    if weights and all(is_number(w) for w in weights) and sum(max(w, 0.0) for w in weights) <= 0:
        problems.add("towers[*].weight", "all weights are zero; give at least one tower a positive weight")


def _resolve_links(clean: list[tuple[int, TowerSpec]], embedding_dim: int, problems: Problems
                   ) -> list[tuple[int, TowerSpec]]:
    """The towers that read others (an interrogator's base caption tower, a fusion tower's inputs) checked against
    the manifest's towers and completed from them (`TowerKind.resolve`)."""
    by_name = {spec.name: spec for _, spec in clean}
    out = []
    for index, spec in clean:
        kind, label = kind_of(spec), tower_label(index, spec.name)
        source = kind.text_source(spec) if isinstance(spec, NetworkSpec) else None
        other = by_name.get(source) if source is not None else None
        if source is not None and not (isinstance(other, NetworkSpec) and kind_of(other).output(other,
                                                                                               embedding_dim).texts):
            problems.add(f"{label}.{spec.kind}.base", f"{source!r} must name a caption tower of this manifest (it runs "
                                                      "for its texts, whatever its weight)")
        missing = [read for read in kind.reads(spec) if read not in by_name and read != source]
        for read in missing:
            problems.add(f"{label}.inputs", f"{read!r} is not a tower of this manifest "
                                            f"({', '.join(by_name) or 'none'})")
        reads_all = kind.reads(spec) and all(r in by_name for r in kind.reads(spec))
        out.append((index, kind.resolve(spec, by_name, label, embedding_dim, problems) if reads_all else spec))
    return out


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



def load_manifest(path: str | Path, check_files: bool = True) -> Manifest:
    """Read and validate a manifest YAML file (or a named one, e.g. `demo`); raises ManifestError listing every
    problem."""
    path = resolve_manifest(path)
    return parse_manifest(read_yaml(path, ManifestError, "manifest file not found", "; pass --manifest PATH"), path,
                          check_files=check_files)

