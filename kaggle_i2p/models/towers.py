"""Towers: a vision backbone plus its kind's head, mapping an image batch to (B, 384) prompt embeddings.

A `Tower` carries its spec (as timm attaches `pretrained_cfg`), so whoever runs it needs the tower alone. The backbone
comes from the spec's library (`kaggle_i2p.core.registry.LIBRARIES`), the head from its kind (`KINDS`): a regressor's
Linear/MLP, a retrieval tower's head holding its bank. Everything is built offline and the weights come only from the
manifest's local checkpoint. Running at a resolution other than the checkpoint's uses the libraries' own
position-embedding resampling, which each library module owns.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..core.errors import EntryFieldError, I2PError
from ..core.progress import say, size_text
from ..manifest import (
    DEFAULT_EMBEDDING_DIM,
    Manifest,
    ManifestError,
    NetworkSpec,
    TowerSpec,
    ViewOutput,
    kind_of,
    load_manifest,
    tower_label,
)
from .backbones import BackboneLibrary, PosEmbedForSize, library
from .checkpoints import (
    KeyRuleError,
    Source,
    TowerLoadError,
    WeightSetsError,
    apply_key_rules,
    backbone_layout,
    checkpoint_shapes_and_keys,
    fit_layout,
    key_diff,
    read_weights,
    sha256_mismatch,
    source_identity,
    source_label,
    source_parts,
    suggest_key_rules,
    suggest_rename,
    under,
    weights_sha256,
)

log = logging.getLogger("kaggle_i2p")


class Tower(nn.Module):
    """backbone -> head, carrying its spec; its `state_dict()` (`backbone.*`, `head.*`) is the checkpoint format."""

    def __init__(self, backbone: nn.Module, head: nn.Module, spec: NetworkSpec,
                 pos_embed_for_size: PosEmbedForSize | None = None, native_size: int | None = None,
                 pos_params: tuple[str, ...] = ()):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        # Fixed-grid ViTs (open_clip's) have fixed-size position embeddings: for other sizes, a resampled copy is
        # swapped in functionally (the stored parameters never change), kept per size while the parameters the
        # library names (`pos_params`) are unchanged; without names it is made again for every batch.
        self._pos_embed_for_size = pos_embed_for_size
        self._native_size = native_size
        self._pos_params = pos_params
        self._pos_cache: dict[tuple, dict[str, torch.Tensor]] = {}

    @property
    def library(self) -> BackboneLibrary:
        """The library the backbone comes from, which answers what generic code asks of it."""
        return library(self.spec.library)

    def _backbone_params_for(self, height: int, width: int) -> dict[str, torch.Tensor] | None:
        if self._pos_embed_for_size is None or (height, width) == (self._native_size, self._native_size):
            return None
        if not self._pos_params:
            return self._pos_embed_for_size(self.backbone, height, width)
        tensors = {**dict(self.backbone.named_parameters()), **dict(self.backbone.named_buffers())}
        key = (height, width, *((t.device, t.dtype, t._version, t.data_ptr())
                                for t in (tensors[name] for name in self._pos_params)))
        if key not in self._pos_cache:
            self._pos_cache = {key: self._pos_embed_for_size(self.backbone, height, width)}
        return self._pos_cache[key]

    def forward(self, images: torch.Tensor) -> torch.Tensor | ViewOutput:
        """The head's output on the backbone's: a tensor (B, width), or a kind's whole record (`ViewOutput`: the
        values, which rows have one, the texts)."""
        override = self._backbone_params_for(images.shape[-2], images.shape[-1])
        if override is None:
            features = self.backbone(images)
        else:
            features = torch.func.functional_call(self.backbone, override, (images,), strict=False)
        return self.head(features)


def build_tower(spec: TowerSpec, embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> Tower:
    """Build the tower's architecture with random weights, touching no network and no checkpoint."""
    if not isinstance(spec, NetworkSpec):
        raise ValueError(f"tower {spec.name!r} is a {spec.kind}: a constant vector, no network")
    kind = kind_of(spec)
    backbone = library(spec.library).build_for(spec.arch, spec.native_resolution, kind.backbone_outputs(spec),
                                               spec.features, spec.backbone)
    head = kind.build_head(spec, backbone.out_dim, embedding_dim)
    return Tower(backbone.module, head, spec, backbone.pos_embed_for_size, backbone.native_size, backbone.pos_params)


def at_resolution(tower: Tower, resolution: int, embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> Tower:
    """The same weights rebuilt natively at `resolution`, position embeddings resampled once (the 2nd place's
    224 -> 336/448 step); its spec says the new native resolution. Convnets and towers already there come back
    unchanged."""
    spec, lib = tower.spec, tower.library
    if lib.position_grid(tower.backbone) is None or spec.native_resolution == resolution or (
            spec.native_resolution is None and lib.native_size(tower.backbone) == resolution):
        return tower
    new_spec = replace(spec, native_resolution=resolution)
    with torch.device("meta"):
        new = build_tower(new_spec, embedding_dim)
    backbone_state = lib.resample_position_embeddings(tower.backbone.state_dict(), new.backbone)
    state = {**{f"backbone.{k}": v for k, v in backbone_state.items()},
             **{f"head.{k}": v for k, v in tower.head.state_dict().items()}}
    new = _materialize(new, state, embedding_dim)
    parameter = next(tower.parameters())
    return new.to(parameter.device).train(tower.training)


def architecture_problems(towers: Sequence[tuple[int, TowerSpec]],
                          embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> list[str]:
    """Build each (index, tower) that runs a network on the meta device (no memory, no weights) and run it at every
    resolution.

    Catches unknown archs, resolutions that are not multiples of the patch size or that the arch cannot run at, and
    head/feature mismatches, before any checkpoint is read; one line per problem, naming the tower and field.
    """
    problems: list[str] = []
    for index, spec in towers:
        if not isinstance(spec, NetworkSpec):
            continue
        label = tower_label(index, spec.name)
        say(f"checking {label}: {spec.library} {spec.arch} at {list(spec.image.resolutions)} (meta device, no "
            "weights)")
        try:
            with torch.device("meta"):
                tower = build_tower(spec, embedding_dim)
        except EntryFieldError as err:  # the library's own check, naming its field (`features`, `backbone.x`)
            problems.append(f"{label}.{err.field}: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - any build failure is reported as a manifest problem
            problems.append(f"{label}.arch: cannot build {spec.library} model {spec.arch!r}: {err}")
            continue
        patch = tower.library.patch_size(tower.backbone)
        for res in spec.image.resolutions:
            if patch and res % patch:
                lower, upper = (res // patch) * patch, (res // patch + 1) * patch
                problems.append(f"{label}.image.resolutions: {res} is not a multiple of the patch size {patch} of "
                                f"{spec.arch}; use {lower} or {upper}")
                continue
            try:
                with torch.no_grad():
                    out = tower.eval()(torch.empty(1, 3, res, res, device="meta"))
            except EntryFieldError as err:  # the kind's own check, naming its field
                problems.append(f"{label}.{err.field}: {err}")
                continue
            except Exception as err:  # noqa: BLE001
                problems.append(f"{label}.image.resolutions: {spec.arch} cannot run at {res}x{res}: {err}")
                continue
            expected = spec.forward_dim(embedding_dim)
            out = out.values if isinstance(out, ViewOutput) else out  # a record (a caption tower's) or its values
            if tuple(out.shape) != (1, expected):
                problems.append(f"{label}.head: the network outputs {tuple(out.shape)}, expected (1, {expected})")
    return problems


def _size(checkpoint: object) -> str:
    """ ` (1.2 GB)`: what a checkpoint's files hold, for a progress line; empty when there is none to read."""
    if checkpoint is None:
        return ""
    files = [f for part in source_parts(checkpoint) if part.exists()
             for f in (part.rglob("*") if part.is_dir() else [part]) if f.is_file()]
    return f" ({size_text(sum(f.stat().st_size for f in files))})" if files else ""


def check_architectures(towers: Sequence[TowerSpec], embedding_dim: int = DEFAULT_EMBEDDING_DIM,
                        source: str | Path = "manifest") -> None:
    """`architecture_problems` for these towers; raises ManifestError (naming `source`) listing each problem."""
    problems = architecture_problems(list(enumerate(towers)), embedding_dim)
    if problems:
        raise ManifestError(source, problems)


def checkpoint_problems(towers: Sequence[tuple[int, TowerSpec]],
                        embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> list[str]:
    """Every checkpoint hashed (against the manifest's sha256) and its keys and shapes matched against the tower
    built on the meta device, all towers at once, before any weights load."""
    problems = []
    for index, spec in towers:
        if not isinstance(spec, NetworkSpec):
            continue
        label = tower_label(index, spec.name)
        say(f"checking {label}: {'sha256, ' if spec.sha256 else ''}keys and shapes of {spec.checkpoint_label}"
            f"{_size(spec.checkpoint)}")
        try:
            actual = sha256_mismatch(spec.weights_source, spec.sha256)
            if actual:
                problems.append(f"{label}.sha256: {source_label(spec.weights_source)} has sha256 {actual}, the "
                                f"manifest says {spec.sha256}; the file is corrupt or not the one the manifest means")
                continue
            fit = checkpoint_fit(spec, embedding_dim)
        except WeightSetsError as err:  # a model and its EMA in one file: the entry must say which
            problems.append(f"{label}.checkpoint_keys.weights: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - an unreadable file is one problem line
            text = str(err)
            problems.append(f"{label}.checkpoint: " + (text if isinstance(err, I2PError) else
                                                       f"cannot read {spec.checkpoint_label}: {type(err).__name__}: "
                                                       f"{text}"))
            continue
        if fit.problems and all(p.startswith("checkpoint_keys") for p in fit.problems):
            files = " + ".join(p.name for p in source_parts(spec.checkpoint))
            problems += [f"{label}.{p.replace(': ', f': {files}: ', 1)}" for p in fit.problems]
        elif fit.problems:
            problems.append(f"{label}.checkpoint: {spec.checkpoint_label} does not match {spec.library} {spec.arch} + "
                            f"{spec.head_name}:\n      " + "\n      ".join(fit.problems))
    return problems


@dataclass(frozen=True)
class CheckpointFit:
    """How a checkpoint file's keys become its tower's, decided from the file's keys and shapes alone."""

    problems: tuple[str, ...]  # the key differences no layout resolves, with the fix when one rename makes it fit
    notes: tuple[str, ...]  # what was done: checkpoint_keys applied, the layout it was recognised as
    left_out: int  # the file's keys no tower key takes: ignored by rule, a whole CLIP file's text tower
    as_saved: bool  # the file holds exactly the tower's keys at its top level (`kaggle-i2p export`'s format)
    rename: dict[str, str] | None = None  # the one prefix rename that would make it fit, when one does


_FITS: dict[str, CheckpointFit] = {}


def checkpoint_fit(spec: NetworkSpec, embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> CheckpointFit:
    """`fit_checkpoint` on the file's keys and shapes against the tower built on the meta device; memoised per file
    (path, size, times) and entry, so the deep check, the cache key and the run summary read the file's keys once."""
    source = None if spec.checkpoint is None else source_identity(spec.checkpoint)
    memo = json.dumps([source, spec.to_dict(), embedding_dim], sort_keys=True, default=str)
    if memo not in _FITS:
        with torch.device("meta"):
            expected = build_tower(spec, embedding_dim).state_dict()
        if spec.checkpoint is None:  # a program tower: the program holds the weights, the head must have none
            _FITS[memo] = CheckpointFit(_no_checkpoint(expected), (), 0, True)
            return _FITS[memo]
        try:
            shapes, top_keys = checkpoint_shapes_and_keys(spec.checkpoint, spec.weights_choice)
            fitted, notes = fit_checkpoint(spec, expected, shapes)
        except KeyRuleError as err:  # a rule that matches nothing or makes two keys one: each is a problem
            _FITS[memo] = CheckpointFit(tuple(err.problems), (), 0, False)
            return _FITS[memo]
        diff = key_diff(expected, fitted)
        if diff and _only_the_backbone(spec, expected, shapes):
            diff = ["the head is not in this file: the file holds the whole backbone and none of the head's "
                    f"{sum(k.startswith('head.') for k in expected)} key(s) ({spec.head_name}); give its file too "
                    "(checkpoint: [backbone file, head file]), or `head: {type: none}` when the backbone gives the "
                    "embedding", *diff]
        _FITS[memo] = CheckpointFit(tuple(_with_fix(diff, expected, fitted)) if diff else (), tuple(notes),
                                    0 if diff else len(shapes) - len(fitted),
                                    not diff and top_keys == set(expected),
                                    suggest_rename(expected, fitted) if diff else None)
    return _FITS[memo]


def _only_the_backbone(spec: NetworkSpec, expected: Mapping[str, torch.Tensor],
                       shapes: Mapping[str, torch.Tensor]) -> bool:
    """Whether the file is the tower's backbone alone (read as any layout `backbone_layout` knows) while the tower
    has a head of its own: the refusal then says so first, not only as missing and unexpected keys."""
    if not any(k.startswith("head.") for k in expected):
        return False
    lib = library(spec.library)  # the readings that keep every key of the file (a library's whole-model layouts
    found = backbone_layout(under(expected, "backbone."), dict(shapes), lib.classifier_prefixes)  # leave some out)
    return found is not None and not found[1]


def _no_checkpoint(expected: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """A tower without a checkpoint is only right when it has no keys of its own (a program with `head: none`)."""
    if not expected:
        return ()
    return (f"no checkpoint, but the tower's head has {len(expected)} key(s) of its own ("
            f"{', '.join(sorted(expected)[:4])}): add `checkpoint:` with them, or `head: {{type: none}}` when the "
            "program gives the embedding itself",)


NO_CHECKPOINT = "none: the weights are the program's"


def tower_weights_sha256(spec: NetworkSpec, embedding_dim: int, file_sha256: Callable[[Source], str]) -> str:
    """The sha256 naming a tower's weights (the cache's key): the checkpoint file's own when the file holds exactly the
    tower's keys, else that of the tensors under the tower's keys (`checkpoints.weights_sha256`), which is the same
    however the file was wrapped (Lightning, DDP, a bare backbone, `checkpoint_keys`) and equals the file's own sha256
    for a metadata-free safetensors file of the tower's keys. A wrapped file is read whole once for it."""
    if spec.checkpoint is None:  # a program tower whose program holds every weight (the cache keys its content)
        return NO_CHECKPOINT
    fit = checkpoint_fit(spec, embedding_dim)
    if fit.as_saved or fit.problems:  # a file that does not fit is refused before this matters
        return file_sha256(spec.checkpoint)
    state = read_weights(spec.checkpoint, f"tower {spec.name!r}: cannot read checkpoint", select=spec.weights_choice)
    with torch.device("meta"):
        expected = build_tower(spec, embedding_dim).state_dict()
    return weights_sha256(fit_checkpoint(spec, expected, state)[0])


def fit_checkpoint(spec: NetworkSpec, expected: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A checkpoint's tensors under the tower's keys: the entry's `checkpoint_keys` first, then the layouts people
    save towers in (`checkpoints.fit_layout`: Lightning's `model.`, a bare backbone with its library's classifier
    as the head, the library's own wrapping); notes on what was done. Strictness is the caller's `key_diff`."""
    notes = []
    rules = spec.checkpoint_keys
    if rules is not None and (rules.strip or rules.rename or rules.ignore):  # (`weights` chose the set when read)
        state, ignored = apply_key_rules(state, rules.strip, rules.rename, rules.ignore)
        notes.append("checkpoint_keys applied" + (f", {ignored} key(s) ignored" if ignored else ""))
    lib = library(spec.library)
    state, layout = fit_layout(expected, state, lib.classifier_prefixes, lib.layouts_for(spec.arch))
    if layout:
        notes.append(f"read as {layout}")
    return state, notes


def _with_fix(diff: list[str], expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> list[str]:
    """The key differences, and the `checkpoint_keys` that would fix them when one prefix rename does."""
    rules = suggest_key_rules(expected, got)
    return diff + ([f"fix: add `{rules}` to the tower's entry"] if rules else [])


def kind_problems(towers: Sequence[tuple[int, TowerSpec]], embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> list[str]:
    """What each tower's kind checks deeply besides the checkpoint (a retrieval bank's index, read whole), and every
    text model a tower embeds texts with (`models.text.text_model_problem`: weights there, loads, right width)."""
    from .text import text_model_problem

    problems = []
    for index, spec in towers:
        label = tower_label(index, spec.name)
        problems += kind_of(spec).deep_problems(spec, label)
        if isinstance(spec, NetworkSpec):
            problems += [f"{label}: text model {problem}" for folder in kind_of(spec).text_models(spec)
                         if (problem := text_model_problem(folder, embedding_dim))]
    return problems


def validate_manifest(manifest: str | Path | Manifest, *, check_files: bool = True, deep: bool = False) -> Manifest:
    """Everything that can be checked before weights load, every problem reported at once: the schema and paths,
    each tower's architecture at each resolution, and (`deep`) each checkpoint's sha256, keys and shapes."""
    if isinstance(manifest, Manifest):
        loaded, path, problems = manifest, manifest.path, []
        towers, dim = list(enumerate(manifest.towers)), manifest.embedding_dim
    else:
        try:
            loaded = load_manifest(manifest, check_files=check_files)
            path, problems, towers, dim = loaded.path, [], list(enumerate(loaded.towers)), loaded.embedding_dim
        except ManifestError as err:  # keep going with the towers that parsed cleanly
            loaded, path, problems = None, err.path, list(err.problems)
            towers, dim = err.clean_towers, err.embedding_dim
    arch_problems = architecture_problems(towers, dim)
    problems += arch_problems
    if deep and (check_files or loaded is None):
        broken = {p.split(".", 1)[0] for p in arch_problems}
        problems += checkpoint_problems([(i, s) for i, s in towers if tower_label(i, s.name) not in broken], dim)
        problems += kind_problems(towers, dim)
    if problems or loaded is None:
        raise ManifestError(path, problems)
    return loaded


def _has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def load_tower(spec: NetworkSpec, embedding_dim: int = DEFAULT_EMBEDDING_DIM,
               device: str | torch.device = "cpu") -> Tower:
    """Build the tower and load its checkpoint strictly (after checksum and prefix stripping); eval mode.

    The architecture is built on the meta device and the checkpoint's tensors are assigned to it, so no time goes
    into a random initialisation that would be overwritten (15 s for ConvNeXt-XXL on a CPU). Towers with buffers
    that only their constructor computes (EVA's rotary tables) are built normally instead.
    """
    actual = sha256_mismatch(spec.weights_source, spec.sha256)
    if actual:
        raise TowerLoadError(f"tower {spec.name!r}: {source_label(spec.weights_source)} has sha256 {actual}, manifest "
                             f"says {spec.sha256}; the file is corrupt or not the one the manifest means")
    state = {} if spec.checkpoint is None else read_weights(
        spec.checkpoint, f"tower {spec.name!r}: cannot read checkpoint", device, spec.weights_choice)
    with torch.device("meta"):
        tower = build_tower(spec, embedding_dim)
    expected = tower.state_dict()
    state, notes = fit_checkpoint(spec, expected, state)
    problems = key_diff(expected, state)
    if problems:
        raise TowerLoadError(f"tower {spec.name!r}: checkpoint {spec.checkpoint_label} does not match "
                             f"{spec.library} {spec.arch} + {spec.head_name}:\n  "
                             + "\n  ".join(_with_fix(problems, expected, state)))
    for note in notes:
        log.info("tower %r: %s: %s", spec.name, spec.checkpoint_label, note)
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}  # an fp16 export still gives fp32 weights
    return _materialize(tower, state, embedding_dim).to(device).eval().requires_grad_(False)


def tower_from_state(spec: NetworkSpec, state: Mapping[str, torch.Tensor],
                     embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> Tower:
    """The tower holding exactly `state` (strict), built without a random initialisation."""
    with torch.device("meta"):
        tower = build_tower(spec, embedding_dim)
    return _materialize(tower, state, embedding_dim)


def _materialize(meta_tower: Tower, state: Mapping[str, torch.Tensor], embedding_dim: int) -> Tower:
    """A tower built on the meta device, made real by assigning `state` to it; towers with buffers that only their
    constructor computes (EVA's rotary tables) are built normally and loaded instead."""
    meta_tower.load_state_dict(state, strict=True, assign=True)
    if not _has_meta_tensors(meta_tower):
        return meta_tower
    tower = build_tower(meta_tower.spec, embedding_dim)
    tower.load_state_dict(state, strict=True)
    return tower


FP32_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)  # timm's and open_clip's norms too


def _inputs_to_fp32(module: nn.Module, args: tuple) -> tuple:
    module._input_dtype = args[0].dtype
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _output_to_input_dtype(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(module._input_dtype)


def hold_in_fp16(tower: Tower) -> Tower:
    """The tower with its backbone's weights in fp16 (in place: half the memory, no per-forward weight casts), for
    fp16 inputs without autocast. Norm layers stay fp32 (ConvNeXt's LayerNorm overflows in pure fp16): their inputs
    are cast up and their outputs back. The head stays fp32 on fp32 features, as the regression needs."""
    tower.backbone.half()
    for module in tower.backbone.modules():
        if isinstance(module, FP32_MODULES):
            module.float()
            module.register_forward_pre_hook(_inputs_to_fp32)
            module.register_forward_hook(_output_to_input_dtype)
    tower.head.register_forward_pre_hook(_inputs_to_fp32)
    return tower


def load_initial_weights(tower: Tower, path: str | Path) -> list[str]:
    """Load a local pretrained file into a tower about to be trained; returns notes on what was done.

    Accepted layouts: a kaggle_i2p Tower checkpoint (`backbone.*` and `head.*`, e.g. to continue from an export), or
    the backbone in any layout a serving checkpoint may have (`checkpoints.backbone_layout`): a bare state dict
    (timm), under a wrapper's prefix, or a whole model as its library saves it (open_clip's CLIP, whose `visual.*`
    part is used; HF's whole BLIP-2 or CLIP, of which the image side is used). Position embeddings of another grid
    are resampled; a backbone key missing from the file is an error, and an ImageNet classifier in it is dropped.
    """
    path = Path(path)
    state = read_weights(path, "cannot read initial weights")
    notes = []
    head_state = {}
    expected = tower.backbone.state_dict()
    lib = tower.library
    if any(k.startswith("backbone.") for k in state):
        head_state, state = under(state, "head."), under(state, "backbone.")
        notes.append("a kaggle_i2p tower checkpoint: backbone" + (" and head" if head_state else ""))
    elif (found := backbone_layout(expected, state, lib.classifier_prefixes, lib.layouts_for(tower.spec.arch))):
        state, classifier, layout = found
        notes += [layout] if layout else []
        if classifier:
            notes.append(f"dropped the file's classifier ({len(classifier)} tensor(s))")
    else:  # no reading fits: the library's own, for the key difference reported below
        state, unwrapped = lib.unwrap_checkpoint(state)
        notes += unwrapped
    state = lib.resample_position_embeddings(state, tower.backbone)
    problems = key_diff(expected, state)
    if problems:
        raise TowerLoadError(f"initial weights {path} do not fit the backbone:\n  " + "\n  ".join(problems)
                             + "\n  fix: check tower.library/arch/native_resolution against the file")
    tower.backbone.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    if head_state:
        try:
            tower.head.load_state_dict(head_state, strict=True)
        except RuntimeError as err:
            raise TowerLoadError(f"initial weights {path}: the head does not fit tower.head: {err}") from err
    return notes
