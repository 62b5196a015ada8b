"""Towers: a timm or open_clip vision backbone plus a regression head, mapping an image batch to (B, 384).

Everything is built offline (timm `pretrained=False`, open_clip's vision-tower builder with no pretrained tag) and the
weights come only from the manifest's local checkpoint. Running at a resolution other than the checkpoint's uses the
libraries' own position-embedding resampling: timm's `dynamic_img_size`, open_clip's `resize_pos_embed`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .errors import I2PError
from .manifest import HeadSpec, Manifest, ManifestError, TowerSpec, load_manifest, tower_label

WRAPPER_KEYS = ("state_dict", "model", "ema", "model_ema", "module")


class TowerLoadError(I2PError, RuntimeError):
    """A checkpoint that does not fit its tower, or a file that fails its checksum."""


def build_head(in_dim: int, spec: HeadSpec, out_dim: int) -> nn.Module:
    """The regression head the manifest declares: Linear, or Linear -> norm -> activation -> Linear."""
    if spec.type == "linear":
        return nn.Linear(in_dim, out_dim)
    assert spec.hidden is not None
    norm = {"batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm, "none": lambda _: nn.Identity()}[spec.norm]
    activation = {"relu": nn.ReLU, "gelu": nn.GELU}[spec.activation]
    return nn.Sequential(nn.Linear(in_dim, spec.hidden), norm(spec.hidden), activation(),
                         nn.Linear(spec.hidden, out_dim))


class Tower(nn.Module):
    """backbone -> pooled features -> head; its `state_dict()` (`backbone.*`, `head.*`) is the checkpoint format."""

    def __init__(self, backbone: nn.Module, head: nn.Module,
                 pos_embed_for_size: Callable[[nn.Module, int, int], dict[str, torch.Tensor]] | None = None,
                 native_size: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        # open_clip ViTs have fixed-size position embeddings: for other sizes, a resampled copy is swapped in
        # functionally (the stored parameter never changes), cached per size and parameter version.
        self._pos_embed_for_size = pos_embed_for_size
        self._native_size = native_size
        self._pos_cache: dict[tuple, dict[str, torch.Tensor]] = {}

    def _backbone_params_for(self, height: int, width: int) -> dict[str, torch.Tensor] | None:
        if self._pos_embed_for_size is None or (height, width) == (self._native_size, self._native_size):
            return None
        pos = self.backbone.positional_embedding
        key = (height, width, pos.device, pos.dtype, pos._version, pos.data_ptr())
        if key not in self._pos_cache:
            self._pos_cache = {key: self._pos_embed_for_size(self.backbone, height, width)}
        return self._pos_cache[key]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        override = self._backbone_params_for(images.shape[-2], images.shape[-1])
        if override is None:
            features = self.backbone(images)
        else:
            features = torch.func.functional_call(self.backbone, override, (images,), strict=False)
        return self.head(features)


def _build_timm_backbone(spec: TowerSpec) -> tuple[nn.Module, int, None, None]:
    import timm

    if not timm.is_model(spec.arch):
        raise ValueError(f"timm has no model named {spec.arch!r} (timm {timm.__version__}); "
                         "check the spelling with timm.list_models('*pattern*')")
    logits = spec.kind == "retrieval" and spec.retrieval.score == "logits"
    kwargs: dict = {"pretrained": False, "num_classes": spec.retrieval.rows if logits else 0}
    if spec.native_resolution is not None:
        kwargs["img_size"] = spec.native_resolution
    try:  # ViT-style models resample their position embeddings to the input size at every forward
        model = timm.create_model(spec.arch, dynamic_img_size=True, **kwargs)
    except TypeError as err:
        if "dynamic_img_size" not in str(err):
            raise
        model = timm.create_model(spec.arch, **kwargs)  # convolutional: any input size works as it is
    return model, int(model.num_classes if logits else model.num_features), None, None


def _open_clip_config(arch: str) -> dict:
    import open_clip

    if arch.endswith(".json"):
        return json.loads(Path(arch).read_text(encoding="utf-8"))
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"open_clip has no model config named {arch!r} (open_clip {open_clip.__version__}); "
                         "see open_clip.list_models(), or give the path of a model-config .json")
    return config


def _open_clip_pos_embed_to_grid(positional_embedding: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """open_clip's own `resize_pos_embed` (class token kept, the patch grid resampled)."""
    from open_clip.model import resize_pos_embed

    target = nn.Module()
    target.visual = nn.Module()
    target.visual.grid_size = tuple(grid)
    state = {"visual.positional_embedding": positional_embedding}
    resize_pos_embed(state, target)
    return state["visual.positional_embedding"]


def _resize_open_clip_pos_embed(visual: nn.Module, height: int, width: int) -> dict[str, torch.Tensor]:
    """A copy of the visual tower's position embedding resampled for a height x width input."""
    patch_h, patch_w = visual.patch_size if isinstance(visual.patch_size, tuple) else (visual.patch_size,) * 2
    grid = (height // patch_h, width // patch_w)
    return {"positional_embedding": _open_clip_pos_embed_to_grid(visual.positional_embedding, grid)}


def resample_position_embeddings(state: Mapping[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """`state` (backbone keys) with absolute position embeddings resampled to `backbone`'s patch grid, by the
    libraries' own functions (timm `resample_abs_pos_embed`, open_clip `resize_pos_embed`); other tensors as given."""
    expected = backbone.state_dict()
    out = dict(state)
    for key, value in state.items():
        if key not in expected or tuple(expected[key].shape) == tuple(value.shape):
            continue
        if key == "pos_embed":  # timm ViT / EVA: (1, prefix + gh * gw, C)
            from timm.layers import resample_abs_pos_embed

            prefix = 0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 1))
            out[key] = resample_abs_pos_embed(value.float(), new_size=list(backbone.patch_embed.grid_size),
                                              num_prefix_tokens=prefix).to(value.dtype)
        elif key == "positional_embedding" and hasattr(backbone, "grid_size"):  # open_clip ViT: (1 + gh * gw, C)
            out[key] = _open_clip_pos_embed_to_grid(value, backbone.grid_size)
    return out


def has_position_grid(tower: Tower) -> bool:
    """Whether the backbone's absolute position embeddings tie it to one input grid (ViT/EVA), unlike a convnet."""
    names = dict(tower.backbone.named_parameters())
    return "pos_embed" in names or "positional_embedding" in names


def at_resolution(tower: Tower, spec: TowerSpec, resolution: int, embedding_dim: int = 384) -> tuple[Tower, TowerSpec]:
    """The same weights rebuilt natively at `resolution`, position embeddings resampled once (the 2nd place's
    224 -> 336/448 step); convnets and towers already there come back unchanged."""
    if not has_position_grid(tower) or spec.native_resolution == resolution or (
            spec.native_resolution is None and _native_size(tower) == resolution):
        return tower, spec
    new_spec = replace(spec, native_resolution=resolution)
    with torch.device("meta"):
        new = build_tower(new_spec, embedding_dim)
    backbone_state = resample_position_embeddings(tower.backbone.state_dict(), new.backbone)
    state = {**{f"backbone.{k}": v for k, v in backbone_state.items()},
             **{f"head.{k}": v for k, v in tower.head.state_dict().items()}}
    new = _given_state(new, new_spec, state, embedding_dim)
    parameter = next(tower.parameters())
    return new.to(parameter.device).train(tower.training), new_spec


def _native_size(tower: Tower) -> int | None:
    """The input size the backbone's position embeddings are laid out for (ViTs), else None."""
    grid = getattr(getattr(tower.backbone, "patch_embed", None), "grid_size", None) or getattr(
        tower.backbone, "grid_size", None)
    size = patch_size(tower)
    return None if grid is None or size is None else int(grid[0]) * size


def _build_open_clip_backbone(spec: TowerSpec) -> tuple[nn.Module, int, Callable | None, int | None]:
    from open_clip.model import _build_vision_tower
    from open_clip.transformer import VisionTransformer

    if spec.kind == "retrieval" and spec.retrieval.score == "logits":
        raise ValueError("an open_clip image tower gives embeddings, not class logits: use score: embedding with a "
                         "bank whose keys are the matching CLIP text embeddings")
    config = _open_clip_config(spec.arch)
    vision_cfg = dict(config["vision_cfg"])
    if spec.native_resolution is not None:
        vision_cfg["image_size"] = spec.native_resolution
    visual = _build_vision_tower(config["embed_dim"], vision_cfg, quick_gelu=config.get("quick_gelu", False))
    if not isinstance(visual, VisionTransformer):  # timm-trunk (ConvNeXt) towers run at any size as they are
        return visual, int(config["embed_dim"]), None, None
    size = vision_cfg.get("image_size", 224)
    return visual, int(config["embed_dim"]), _resize_open_clip_pos_embed, size if isinstance(size, int) else size[0]


def output_dim(spec: TowerSpec, embedding_dim: int = 384) -> int:
    """What the tower's network outputs: the embedding (regressor), or the scores a retrieval tower ranks with."""
    if spec.kind == "retrieval":
        return spec.retrieval.rows if spec.retrieval.score == "logits" else spec.retrieval.key_dim
    return embedding_dim


def build_tower(spec: TowerSpec, embedding_dim: int = 384) -> Tower:
    """Build the tower's architecture with random weights, touching no network and no checkpoint."""
    if spec.kind == "prior":
        raise ValueError(f"tower {spec.name!r} is a prior: a constant vector, no network")
    builder = _build_timm_backbone if spec.library == "timm" else _build_open_clip_backbone
    backbone, feature_dim, resizer, native_size = builder(spec)
    head = nn.Identity() if spec.kind == "retrieval" else build_head(feature_dim, spec.head, embedding_dim)
    return Tower(backbone, head, pos_embed_for_size=resizer, native_size=native_size)


def patch_size(tower: Tower) -> int | None:
    """The patch size of a ViT-style backbone (input sizes must be multiples of it), else None."""
    backbone = tower.backbone
    for candidate in (getattr(getattr(backbone, "patch_embed", None), "patch_size", None),
                      getattr(backbone, "patch_size", None)):
        if candidate is not None:
            return int(candidate[0] if isinstance(candidate, (tuple, list)) else candidate)
    return None


def architecture_problems(towers: Sequence[tuple[int, TowerSpec]], embedding_dim: int = 384) -> list[str]:
    """Build each (index, tower) on the meta device (no memory, no weights) and run it at every resolution.

    Catches unknown archs, resolutions that are not multiples of the patch size or that the arch cannot run at, and
    head/feature mismatches, before any checkpoint is read; one line per problem, naming the tower and field.
    """
    problems: list[str] = []
    for index, spec in towers:
        label = tower_label(index, spec.name)
        if spec.kind == "prior":
            continue
        try:
            with torch.device("meta"):
                tower = build_tower(spec, embedding_dim)
        except Exception as err:  # noqa: BLE001 - any build failure is reported as a manifest problem
            problems.append(f"{label}.arch: cannot build {spec.library} model {spec.arch!r}: {err}")
            continue
        patch = patch_size(tower)
        for res in spec.image.resolutions:
            if patch and res % patch:
                lower, upper = (res // patch) * patch, (res // patch + 1) * patch
                problems.append(f"{label}.image.resolutions: {res} is not a multiple of the patch size {patch} of "
                                f"{spec.arch}; use {lower} or {upper}")
                continue
            try:
                with torch.no_grad():
                    out = tower.eval()(torch.empty(1, 3, res, res, device="meta"))
            except Exception as err:  # noqa: BLE001
                problems.append(f"{label}.image.resolutions: {spec.arch} cannot run at {res}x{res}: {err}")
                continue
            expected = output_dim(spec, embedding_dim)
            if tuple(out.shape) != (1, expected):
                field = "retrieval" if spec.kind == "retrieval" else "head"
                problems.append(f"{label}.{field}: the network outputs {tuple(out.shape)}, expected (1, {expected})"
                                + (" (the bank's rows or key size)" if spec.kind == "retrieval" else ""))
    return problems


def check_architectures(manifest: Manifest) -> None:
    """`architecture_problems` for every tower of a manifest; raises ManifestError listing each problem."""
    problems = architecture_problems(list(enumerate(manifest.towers)), manifest.embedding_dim)
    if problems:
        raise ManifestError(manifest.path, problems)


def checkpoint_shapes(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's keys (prefixes stripped) with meta tensors of their shapes, read without loading weights:
    the safetensors header, or a memory-mapped torch file."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
        return strip_prefixes({k: torch.empty(shape, device="meta") for k, shape in shapes.items()})
    state = read_state_dict(path, mmap=True)
    return strip_prefixes({k: torch.empty(tuple(v.shape), device="meta") for k, v in state.items()})


def checkpoint_problems(towers: Sequence[tuple[int, TowerSpec]], embedding_dim: int = 384) -> list[str]:
    """Every checkpoint hashed (against the manifest's sha256) and its keys and shapes matched against the tower
    built on the meta device, all towers at once, before any weights load."""
    problems = []
    for index, spec in towers:
        if spec.kind == "prior":
            continue
        label = tower_label(index, spec.name)
        try:
            actual = sha256_mismatch(spec)
            if actual:
                problems.append(f"{label}.sha256: {spec.checkpoint} has sha256 {actual}, the manifest says "
                                f"{spec.sha256}; the file is corrupt or not the one the manifest means")
                continue
            shapes = checkpoint_shapes(spec.checkpoint)
        except Exception as err:  # noqa: BLE001 - an unreadable file is one problem line
            problems.append(f"{label}.checkpoint: cannot read {spec.checkpoint}: {type(err).__name__}: {err}")
            continue
        with torch.device("meta"):
            expected = build_tower(spec, embedding_dim).state_dict()
        diff = _key_diff(expected, shapes)
        if diff:
            problems.append(f"{label}.checkpoint: {spec.checkpoint} does not match {spec.library} {spec.arch} + "
                            f"{spec.head.type} head:\n      " + "\n      ".join(diff))
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
    if problems or loaded is None:
        raise ManifestError(path, problems)
    return loaded


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints are GB-sized)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: Path) -> str:
    """Resolved path, size, modification and status-change times: any rewrite of the file changes it (the ctime
    cannot be set back, unlike the mtime), so a memoised hash is never served for other content."""
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"


class FileHashes:
    """sha256 of files, memoised in this process by `file_identity`: the deep manifest check, the cache key and the
    load all hash a GB checkpoint once."""

    def __init__(self) -> None:
        self._memo: dict[str, str] = {}

    def __call__(self, path: Path) -> str:
        key = file_identity(path)
        if key not in self._memo:
            self._memo[key] = sha256_file(Path(path))
        return self._memo[key]

    def remember(self, path: Path, digest: str) -> None:
        """Take a hash memoised elsewhere (the cache's file) for this path as it is now."""
        self._memo[file_identity(path)] = digest


checkpoint_sha256 = FileHashes()


def sha256_mismatch(spec: TowerSpec) -> str | None:
    """The checkpoint file's sha256 when it is not the one the manifest names, else None (also without a sha256)."""
    if not spec.sha256:
        return None
    actual = checkpoint_sha256(spec.checkpoint)
    return None if actual.lower() == spec.sha256.lower() else actual


def read_state_dict(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a .pt/.pth/.bin file via `torch.load(weights_only=True)`
    (`mmap`: memory-mapped, nothing read until used, for files in torch's zip format)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError:
        if not mmap:
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
    # Training checkpoints often wrap the weights: {"state_dict": {...}, "epoch": 3, ...}.
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping):
        raise TowerLoadError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP's leading `module.` and `torch.compile`'s `_orig_mod.` (at any depth) from checkpoint keys."""
    cleaned = {}
    for key, value in state.items():
        key = key.replace("_orig_mod.", "")
        while key.startswith("module."):
            key = key[len("module."):]
        cleaned[key] = value
    return cleaned


def _key_diff(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], limit: int = 8) -> list[str]:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    lines = []
    if missing:
        lines.append(f"{len(missing)} missing key(s): " + ", ".join(missing[:limit]) + (" ..." if len(missing) > limit
                                                                                        else ""))
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:limit])
                     + (" ..." if len(unexpected) > limit else ""))
    for key in mismatched[:limit]:
        lines.append(f"shape mismatch {key}: checkpoint {tuple(got[key].shape)}, model {tuple(expected[key].shape)}")
    if missing and unexpected and all(not k.startswith(("backbone.", "head.")) for k in unexpected[:limit]):
        lines.append("hint: tower checkpoints hold the keys of kaggle_i2p.towers.Tower (backbone.*, head.*); "
                     "export with `kaggle-i2p export` or rename the keys")
    if any(k.startswith("backbone.pos_embed") or k.startswith("backbone.positional_embedding") for k in mismatched):
        lines.append("hint: the position embeddings were trained at another size; set native_resolution")
    return lines


def _has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def load_tower(spec: TowerSpec, embedding_dim: int = 384, device: str | torch.device = "cpu") -> Tower:
    """Build the tower and load its checkpoint strictly (after checksum and prefix stripping); eval mode.

    The architecture is built on the meta device and the checkpoint's tensors are assigned to it, so no time goes
    into a random initialisation that would be overwritten (15 s for ConvNeXt-XXL on a CPU). Towers with buffers
    that only their constructor computes (EVA's rotary tables) are built normally instead.
    """
    actual = sha256_mismatch(spec)
    if actual:
        raise TowerLoadError(f"tower {spec.name!r}: {spec.checkpoint} has sha256 {actual}, manifest says "
                             f"{spec.sha256}; the file is corrupt or not the one the manifest means")
    state = _read_weights(spec.checkpoint, f"tower {spec.name!r}: cannot read checkpoint")
    with torch.device("meta"):
        tower = build_tower(spec, embedding_dim)
    expected = tower.state_dict()
    problems = _key_diff(expected, state)
    if problems:
        raise TowerLoadError(f"tower {spec.name!r}: checkpoint {spec.checkpoint} does not match {spec.library} "
                             f"{spec.arch} + {spec.head.type} head:\n  " + "\n  ".join(problems))
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}  # an fp16 export still gives fp32 weights
    return _given_state(tower, spec, state, embedding_dim).to(device).eval().requires_grad_(False)


def tower_from_state(spec: TowerSpec, state: Mapping[str, torch.Tensor], embedding_dim: int = 384) -> Tower:
    """The tower holding exactly `state` (strict), built without a random initialisation."""
    with torch.device("meta"):
        tower = build_tower(spec, embedding_dim)
    return _given_state(tower, spec, state, embedding_dim)


def _given_state(meta_tower: Tower, spec: TowerSpec, state: Mapping[str, torch.Tensor], embedding_dim: int) -> Tower:
    """Assign `state` to a tower built on the meta device; towers with buffers that only their constructor computes
    (EVA's rotary tables) are built normally and loaded instead."""
    meta_tower.load_state_dict(state, strict=True, assign=True)
    if not _has_meta_tensors(meta_tower):
        return meta_tower
    tower = build_tower(spec, embedding_dim)
    tower.load_state_dict(state, strict=True)
    return tower


def _read_weights(path: Path, failure: str) -> dict[str, torch.Tensor]:
    """`read_state_dict` + `strip_prefixes`; an unreadable file becomes one TowerLoadError: "{failure} {path}: ..."."""
    try:
        return strip_prefixes(read_state_dict(path))
    except TowerLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - unreadable files become one clear error
        raise TowerLoadError(f"{failure} {path}: {err}") from err


def _under(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` whose keys start with `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


CLASSIFIER_PREFIXES = ("head.", "fc.", "classifier.", "head_dist.")  # ImageNet classifiers a regressor drops


def load_initial_weights(tower: Tower, path: str | Path) -> list[str]:
    """Load a local pretrained file into a tower about to be trained; returns notes on what was done.

    Accepted layouts: a bare backbone state dict (timm), a full open_clip CLIP checkpoint (its `visual.*` part is
    used), or a kaggle_i2p Tower checkpoint (`backbone.*` and `head.*`, e.g. to continue from an export). Position
    embeddings of another grid are resampled; a backbone key missing from the file is an error, and an ImageNet
    classifier in it is dropped.
    """
    path = Path(path)
    state = _read_weights(path, "cannot read initial weights")
    notes = []
    head_state = {}
    if any(k.startswith("backbone.") for k in state):
        head_state, state = _under(state, "head."), _under(state, "backbone.")
        notes.append("a kaggle_i2p tower checkpoint: backbone" + (" and head" if head_state else ""))
    elif any(k.startswith("visual.") for k in state):
        dropped = sum(not k.startswith("visual.") for k in state)
        state = _under(state, "visual.")
        notes.append(f"an open_clip CLIP checkpoint: its visual tower ({dropped} text-side tensors left out)")
    expected = tower.backbone.state_dict()
    classifier = sorted(k for k in state if k not in expected and k.startswith(CLASSIFIER_PREFIXES))
    if classifier:
        notes.append(f"dropped the file's classifier ({', '.join(classifier[:4])})")
        state = {k: v for k, v in state.items() if k not in classifier}
    state = resample_position_embeddings(state, tower.backbone)
    problems = _key_diff(expected, state)
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
