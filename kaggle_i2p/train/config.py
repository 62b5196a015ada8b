"""The trainer's YAML config: validated in one pass, before any data or weights are touched.

The `tower:` section is a manifest tower entry (library, arch, head, image preprocessing) plus `init`, the local file
of pretrained backbone weights; the exported tower gets exactly this entry back, so training and serving share one
preprocessing. `stages:` run in order: e.g. a head-only stage (LP), full fine-tuning (FT), then a higher resolution.
Every relative path resolves against the config file's folder; `${VAR}` / `${VAR:-default}` expand from the
environment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..core.registry import LIBRARIES
from ..core.validate import (
    Problems,
    expanded_path,
    is_number,
    number_problem,
    read_yaml,
    resolve_file,
)
from ..dataset.layout import INDEX, TARGETS
from ..kinds.regressor import RegressorSpec
from ..manifest import (
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    ManifestError,
    ParseContext,
    TrainPrecision,
    parse_tower,
)
from ..manifest.fields import checked_fields, entry_field, entry_keys, written_fields
from .lora import LoraSpec

HEAD_INITS = ("random", "text_map")


class TrainConfigError(ManifestError):
    """A training config that cannot be used; the message lists every problem, one per line."""


def optimizer_problem(name: Any) -> str | None:
    """Why `name` is no optimizer a stage can use, or None: torch's AdamW, or one of timm's that needs no package
    we do not have (bitsandbytes' are refused unless it is installed)."""
    import importlib.util

    import timm.optim

    known = timm.optim.list_optimizers()
    if not isinstance(name, str) or name not in known:
        return (f"{name!r} is not an optimizer timm knows; e.g. adamw (default), madgrad, lamb, lion, adan, "
                "adafactor (timm.optim.list_optimizers() lists all)")
    if name.startswith("bnb") and importlib.util.find_spec("bitsandbytes") is None:
        return f"{name} needs bitsandbytes, which is not installed"
    return None


def warmup_problem(value: Any) -> str | None:
    """Why a `warmup` is neither a fraction of the stage (< 1) nor a whole number of steps, or None."""
    if (problem := number_problem(value)) is not None:
        return problem
    return f"{value} must be a fraction of the stage (< 1) or a whole number of steps" \
        if value >= 1 and value != int(value) else None


@dataclass(frozen=True)
class DataConfig:
    """Which rows train and validate, batch sizes, and the light augmentation (crop/jitter; flip off by default).
    Its fields are the `data:` section's keys and defaults; identity=False marks what only operates a run (a resumed
    run may change it)."""

    val_fold: int = 0
    batch_size: int = entry_field(32, bounds=(1, None))
    eval_batch_size: int | None = entry_field(None, identity=False, bounds=(1, None))  # None: twice the batch size
    num_workers: int = entry_field(4, identity=False)
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.1)
    color_jitter: float = entry_field(0.0, bounds=(0.0, 1.0))
    hflip: bool = False
    max_val_images: int | None = entry_field(None, bounds=(1, None))


@dataclass(frozen=True)
class LossConfig:
    """Cosine embedding loss: 1 - cos to the target, optional in-batch negatives over `margin`, optional MSE; its
    fields are the `loss:` section's keys and defaults."""

    margin: float = entry_field(0.0, bounds=(-1.0, None))
    negative_weight: float = 0.0
    mse_weight: float = 0.0


@dataclass(frozen=True)
class OptimSection:
    """The `optim:` section's keys and defaults: AdamW and its schedule, inherited by every stage (a stage may set
    its own lr, weight_decay, layer_decay, warmup and min_lr_scale)."""

    # any of timm's optimizers by name (timm.optim.list_optimizers()): madgrad, lamb, ...
    optimizer: str = entry_field("adamw", check=optimizer_problem)
    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = entry_field(0.75, bounds=(0.0, 1.0))
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: float = entry_field(0.05, check=warmup_problem)  # a fraction of the stage's steps if < 1, else steps
    min_lr_scale: float = entry_field(0.01, bounds=(0.0, 1.0))
    grad_clip: float = 1.0
    accumulation: int = entry_field(1, bounds=(1, None))


@dataclass(frozen=True)
class EmaSection:
    """The `ema:` section's keys and defaults (decay 0: no EMA)."""

    decay: float | None = entry_field(0.9998, bounds=(0.0, 1.0), high_open=True)  # 0 or null: no EMA
    warmup: bool = True


@dataclass(frozen=True)
class TextMapConfig:
    """The `text_map:` section: the CLIP text tower (an open_clip name or model-config .json, and its whole local
    checkpoint), the relative ridge, the embedding batch, and an optional cap on the prompts fitted (a seeded
    sample)."""

    clip_arch: str = entry_field(required=(
        "the CLIP model of the text tower whose image tower this head sits on (an open_clip name or model-config "
        ".json, or a transformers CLIP/SigLIP folder)"))
    clip_checkpoint: Path = entry_field(path=True)
    ridge: float = 1e-3
    batch_size: int = entry_field(256, bounds=(1, None))
    max_prompts: int | None = entry_field(None, bounds=(1, None))


# Keys that change how a run is operated, not what it computes: a resumed run may change them.
OPERATIONAL = {("data", m["key"]) for _, m in written_fields(DataConfig) if not m["identity"]} | {
    ("checkpoint_every",), ("log_every",)}


def _optim_mark(name: str) -> Any:
    """A stage field that a stage may set and otherwise inherits from the optim section: the section's field's marks,
    no default of its own."""
    return dataclasses.field(metadata=next(f for f in dataclasses.fields(OptimSection) if f.name == name).metadata)


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """One stage: epochs at one resolution with one optimizer (fresh AdamW, LLRD groups, warm-up + cosine). The
    optimizer's settings left out are the optim section's; the batch size is the data section's."""

    name: str  # default: stage<index>
    epochs: int = entry_field(bounds=(1, None))
    resolution: int = entry_field(bounds=(MIN_RESOLUTION, MAX_RESOLUTION))
    optimizer: str = _optim_mark("optimizer")  # adamw (torch's), or any of timm's by name
    head_only: bool = False
    freeze_lowest: int = 0
    batch_size: int = entry_field(bounds=(1, None))
    lr: float = _optim_mark("lr")
    weight_decay: float = _optim_mark("weight_decay")
    layer_decay: float = _optim_mark("layer_decay")
    warmup: float = _optim_mark("warmup")  # a fraction of the stage's steps if < 1, else a number of steps
    min_lr_scale: float = _optim_mark("min_lr_scale")
    betas: tuple[float, float] = entry_field(written=False)  # the optim section's, for every stage
    grad_clip: float = entry_field(written=False)
    accumulation: int = entry_field(written=False)
    # the stage's own dataset folder (None: the run's `work`), validated on the run's
    work: Path | None = entry_field(None, path=True)
    # only the index rows of these sources train (None: every row)
    sources: tuple[str, ...] | None = entry_field(None, hint="the index's source names, e.g. [coyo]")
    lora: LoraSpec | None = entry_field(None, section=LoraSpec)  # adapters on a block range, frozen below it


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A validated training config (paths resolved)."""

    path: Path = entry_field(written=False)
    raw: dict = entry_field(written=False)  # the file's mapping, kept in checkpoints so a resume can check it
    work: Path = entry_field(path=True)
    output: Path = entry_field(path=True)
    seed: int = 0
    cpu: bool = False
    tower: RegressorSpec  # its checkpoint is None: export writes it
    init: Path | None = entry_field(written=False)  # the tower's `init:`; None: random initialisation
    text_map: TextMapConfig | None = entry_field(section=TextMapConfig)  # `head.init: text_map`: the CLIP-text map
    data: DataConfig = entry_field(section=DataConfig)
    loss: LossConfig = entry_field(section=LossConfig)
    ema_decay: float = entry_field(written=False)  # the ema section's; 0: no EMA
    ema_warmup: bool = entry_field(written=False)
    precision: TrainPrecision = entry_field("auto", hint="auto: bf16 where the GPU has it, else fp16 with a grad "
                                                         "scaler; fp32 on a CPU")
    stages: tuple[StageConfig, ...]
    # optimizer steps between mid-epoch checkpoints (0: only at epoch ends)
    checkpoint_every: int = 0
    log_every: int = entry_field(50, bounds=(1, None))
    eval_at_start: bool = True


# the top-level settings checked from TrainConfig's marks (the rest are sections and paths with parsers of their own)
TOP_SETTINGS = ("seed", "cpu", "precision", "checkpoint_every", "log_every", "eval_at_start")


# The keys each part of a config file may hold, derived from the dataclasses that hold them (fields marked
# written=False are filled from elsewhere: the optim section, the tower's head, the file itself).
TOP_KEYS = entry_keys(TrainConfig) | {"optim", "ema"}  # the sections every stage and the EMA read their values from
TEXT_MAP_KEYS = entry_keys(TextMapConfig)
STAGE_KEYS = entry_keys(StageConfig)
LORA_KEYS = entry_keys(LoraSpec)


def _dataset_folder(value: Any, where: str, base_dir: Path, check_files: bool, problems: Problems) -> Path | None:
    """A build_dataset.sh folder a config names (`work`, a stage's `work`): resolved, and holding its index and
    targets when files are checked; None when it cannot be used (reported)."""
    what = "the build_dataset.sh folder (index.parquet, targets.npy)"
    if not isinstance(value, str):
        problems.add(where, f"is required: {what}" if value is None else f"{value!r} must be a path: {what}")
        return None
    path = expanded_path(value, base_dir, where, problems)
    if path is None:
        return None
    missing = [name for name in (INDEX, TARGETS) if check_files and not (path / name).is_file()]
    if missing:
        problems.add(where, f"{path} has no {' or '.join(missing)}: build the dataset first (build_dataset.sh, or "
                            f"`python -m kaggle_i2p.dataset index --work {path}` once images exist)")
    return path


def _parse_lora(raw: Any, where: str, stage: Mapping, problems: Problems) -> LoraSpec | None:
    """A stage's `lora:` section: blocks [first, last] (block numbers, or fractions of the blocks), rank, alpha,
    dropout, modules (checked from LoraSpec's marks); the stage may not also be head-only or set freeze_lowest (the
    range sets what is frozen)."""
    import importlib.util

    if not isinstance(raw, Mapping):
        problems.add(where, "must be a mapping, e.g. {blocks: [0.4, 0.8], rank: 16, alpha: 16}")
        return None
    values = checked_fields(LoraSpec, raw, where, problems, skip=("blocks",))
    if importlib.util.find_spec("peft") is None:
        problems.add(where, "LoRA needs peft, which is not installed: pip install peft")
    for key in ("head_only", "freeze_lowest"):
        if stage.get(key):
            problems.add(f"{where.rsplit('.', 1)[0]}.{key}", "is not for a LoRA stage: lora.blocks sets it (frozen "
                                                             "below the range, adapted in it, fully trained above)")
    return LoraSpec(blocks=_lora_blocks(raw.get("blocks"), f"{where}.blocks", problems), **values)


def _lora_blocks(blocks: Any, where: str, problems: Problems) -> tuple[float, float]:
    """[first, last]: whole block numbers from 1, or fractions of the blocks (low < high)."""
    numbers = isinstance(blocks, list) and len(blocks) == 2 and all(is_number(v) for v in blocks)
    whole = numbers and all(isinstance(v, int) for v in blocks) and 1 <= blocks[0] <= blocks[1]
    if whole:
        return blocks[0], blocks[1]
    if numbers and 0 <= blocks[0] < blocks[1] <= 1:
        return float(blocks[0]), float(blocks[1])
    problems.add(where, f"{blocks!r} must be [first, last]: block numbers from 1 (e.g. [13, 24]) or fractions of the "
                        "blocks (e.g. [0.4, 0.8]: the middle 40%)")
    return 1, 1


def _parse_stage(raw: Any, index: int, optim: dict, data: DataConfig, problems: Problems, base_dir: Path,
                 check_files: bool) -> StageConfig | None:
    """One `stages:` entry, checked from StageConfig's marks; what it leaves out is the optim section's (already
    checked) and the data section's batch size."""
    where = f"stages[{index}]"
    if not isinstance(raw, Mapping):
        problems.add(where, "must be a mapping, e.g. {epochs: 1, resolution: 224, head_only: true, lr: 1e-3}")
        return None
    values = checked_fields(StageConfig, raw, where, problems, skip=("work", "lora"),
                            defaults={**optim, "name": f"stage{index}", "batch_size": data.batch_size})
    work = None if "work" not in raw else _dataset_folder(raw["work"], f"{where}.work", base_dir, check_files,
                                                          problems)
    lora = None if raw.get("lora") is None else _parse_lora(raw["lora"], f"{where}.lora", raw, problems)
    if not {"epochs", "resolution"} <= values.keys():  # a bad value stands as its default; a missing one cannot
        return None
    sources = values.pop("sources")
    return StageConfig(**values, work=work, lora=lora, sources=tuple(sorted(sources)) if sources else None,
                       betas=optim["betas"], grad_clip=optim["grad_clip"], accumulation=optim["accumulation"])


def _parse_tower_section(raw: Any, base_dir: Path, last_resolution: int | None,
                         problems: Problems) -> tuple[RegressorSpec | None, Path | None]:
    if not isinstance(raw, Mapping):
        problems.add("tower", "is required: a manifest tower entry (name, library, arch, head, image) plus init, "
                              "the local pretrained weights")
        return None, None
    entry = {k: v for k, v in raw.items() if k != "init"}
    if isinstance(entry.get("head"), Mapping) and "init" in entry["head"]:  # the trainer's, not the served entry's
        entry["head"] = {k: v for k, v in entry["head"].items() if k != "init"}
    for key in ("checkpoint", "sha256", "weight", "kind", "retrieval", "dim_weights"):
        if key in entry:
            problems.add(f"tower.{key}", "is written by `kaggle-i2p export`, not given to the trainer; remove it")
            entry.pop(key)
    entry["weight"] = 1.0
    image = entry.get("image")
    if isinstance(image, Mapping) and "resolutions" not in image and last_resolution is not None:
        entry["image"] = {**image, "resolutions": [last_resolution]}  # serve at the resolution it finished at
    spec = parse_tower(entry, 0, ParseContext(base_dir, problems, check_files=False, needs_checkpoint=False),
                       label="tower")
    if spec is not None and LIBRARIES.get(spec.library).holds_weights:
        problems.add("tower.library", f"library: {spec.library} serves a program as saved; it is not trained here "
                                      "(its weights are the program file's): train in the code that made it, then "
                                      "export again")
        spec = None
    init: Path | None = None
    if "init" not in raw:
        problems.add("tower.init", "is required: the local file of pretrained weights (an open_clip CLIP checkpoint, "
                                   "a timm state dict, or a kaggle_i2p tower); `init: none` trains from random weights")
    elif raw["init"] != "none":
        init = resolve_file(raw["init"], base_dir, "tower.init", problems, "pretrained weights")
    return spec, init


def _parse_text_map(data: Mapping, base_dir: Path, check_files: bool, problems: Problems) -> TextMapConfig | None:
    """`tower.head.init` and the `text_map:` section it needs: None for a random head (the default)."""
    head = (data.get("tower") or {}).get("head") if isinstance(data.get("tower"), Mapping) else None
    init = head.get("init", "random") if isinstance(head, Mapping) else "random"
    section = data.get("text_map")
    if init not in HEAD_INITS:
        problems.add("tower.head.init", f"{init!r} is not one of {', '.join(HEAD_INITS)} (text_map: the head starts "
                                        "as the least-squares map from the prompts' CLIP text embeddings)")
        return None
    if init == "random":
        if section is not None:
            problems.add("text_map", "is only read with tower.head.init: text_map; set it or remove this section")
        return None
    if not isinstance(section, Mapping):
        problems.add("text_map", "is required with tower.head.init: text_map: {clip_arch, clip_checkpoint} (the "
                                 "CLIP whose text tower maps the prompts), optionally ridge, batch_size, max_prompts")
        return None
    if head.get("type") != "linear":
        problems.add("tower.head.type", "must be linear with init: text_map (the map is one Linear layer)")
    values = checked_fields(TextMapConfig, section, "text_map", problems, skip=("clip_checkpoint",))
    arch = values.get("clip_arch", "")
    if arch.endswith(".json") or (arch and (base_dir / arch).is_dir()):  # a config, or an HF model's folder
        arch = values["clip_arch"] = str(expanded_path(arch, base_dir, "text_map.clip_arch", problems) or arch)
    checkpoint = section.get("clip_checkpoint")
    if check_files:
        checkpoint = resolve_file(checkpoint, base_dir, "text_map.clip_checkpoint", problems,
                                  "whole CLIP checkpoint (text tower included: open_clip's file, or the HF "
                                  "model's weights)")
        if checkpoint is not None and arch:
            from ..bank.build import clip_checkpoint_problem

            if (problem := clip_checkpoint_problem(arch, checkpoint)) is not None:
                problems.add("text_map.clip_checkpoint", problem)
    elif isinstance(checkpoint, str):
        checkpoint = expanded_path(checkpoint, base_dir, "text_map.clip_checkpoint", problems, check_files=False)
    else:
        problems.add("text_map.clip_checkpoint", "is required: the whole open_clip CLIP checkpoint")
    return TextMapConfig(**{"clip_arch": "", **values}, clip_checkpoint=Path(checkpoint or "."))


def _adapter_problems(tower: RegressorSpec, stages: list[tuple[int, LoraSpec]]) -> list[str]:
    """`lora.adapter_problems` on the tower built on the meta device (nothing when it cannot be built: the
    architecture check reports that)."""
    import torch

    from ..models.towers import build_tower
    from .lora import adapter_problems

    try:
        with torch.device("meta"):
            built = build_tower(tower)
    except Exception:  # noqa: BLE001 - an arch that does not build is the architecture check's problem
        return []
    return adapter_problems(built, stages, tower.arch)


def parse_train_config(data: Any, path: str | Path, check_files: bool = True) -> TrainConfig:
    """Validate a parsed config mapping; `path` anchors relative paths and names the file in errors; `check_files`:
    the work folder must hold the dataset (reported with every other problem, before anything is built)."""
    path = Path(path)
    base_dir = path.resolve().parent
    problems = Problems()
    if not isinstance(data, Mapping):
        raise TrainConfigError(path, ["the file must hold a mapping with work, output, tower and stages"])
    problems.unknown_keys(data, TOP_KEYS, what="top-level key")
    work = _dataset_folder(data.get("work"), "work", base_dir, check_files, problems)
    output = _output_folder(data.get("output"), base_dir, problems)
    settings = checked_fields(TrainConfig, data, "", problems, only=TOP_SETTINGS)
    data_config = DataConfig(**checked_fields(DataConfig, data.get("data"), "data", problems))
    if data_config.eval_batch_size is None:
        data_config = replace(data_config, eval_batch_size=2 * data_config.batch_size)
    if data_config.crop_scale[1] > 1:
        problems.add("data.crop_scale", "is a fraction of the image area: at most 1.0")
    loss = LossConfig(**checked_fields(LossConfig, data.get("loss"), "loss", problems))
    optim = checked_fields(OptimSection, data.get("optim"), "optim", problems)
    ema = checked_fields(EmaSection, data.get("ema"), "ema", problems)
    stages = _parse_stages(data.get("stages"), optim, data_config, problems, base_dir, check_files)
    tower, init = _parse_tower_section(data.get("tower"), base_dir, stages[-1].resolution if stages else None,
                                       problems)
    text_map = _parse_text_map(data, base_dir, check_files, problems)
    lora_stages = [(i, s.lora) for i, s in enumerate(stages) if s.lora is not None]
    if tower is not None and lora_stages:  # the ranges and modules against the tower, with every other problem
        for problem in _adapter_problems(tower, lora_stages):
            where, _, message = problem.partition(": ")
            problems.add(where, message)
    if problems.items:
        raise TrainConfigError(path, list(dict.fromkeys(problems.items)))
    return TrainConfig(path=path, raw=dict(data), work=work, output=output, tower=tower, init=init, text_map=text_map,
                       data=data_config, loss=loss, ema_decay=ema["decay"] or 0.0, ema_warmup=ema["warmup"],
                       stages=tuple(stages), **settings)


def _output_folder(value: Any, base_dir: Path, problems: Problems) -> Path | None:
    """The run's `output` folder, resolved (None when missing or naming an unset variable: reported)."""
    if not isinstance(value, str):
        problems.add("output", "is required: the folder for checkpoints and metrics")
        return None
    return expanded_path(value, base_dir, "output", problems)


def _parse_stages(raw: Any, optim: dict, data: DataConfig, problems: Problems, base_dir: Path, check_files: bool
                  ) -> list[StageConfig]:
    """The `stages:` list (at least one), each stage parsed; two stages of one name are a problem."""
    if not isinstance(raw, list) or not raw:
        problems.add("stages", "must be a non-empty list, e.g. [{epochs: 1, resolution: 224, head_only: true, "
                               "lr: 1e-3}, {epochs: 5, resolution: 224}]")
        raw = []
    stages = [stage for index, entry in enumerate(raw)
              if (stage := _parse_stage(entry, index, optim, data, problems, base_dir, check_files)) is not None]
    names = [s.name for s in stages]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.add("stages[*].name", f"{name!r} is used twice; stage names label checkpoints and metrics")
    return stages


def load_train_config(path: str | Path, check_files: bool = True) -> TrainConfig:
    """Read and validate a training config YAML file; raises TrainConfigError listing every problem."""
    path = Path(path)
    return parse_train_config(read_yaml(path, TrainConfigError, "config file not found", ""), path, check_files)


def config_changes(old: Mapping, new: Mapping) -> list[str]:
    """What differs between a checkpoint's config and the current one, ignoring operational keys; the new config may
    append stages (continue a finished run at a higher resolution) but not change the ones already run."""
    changes = []

    def walk(a: Any, b: Any, where: tuple) -> None:
        if where in OPERATIONAL:
            return
        if where == ("stages",) and isinstance(a, list) and isinstance(b, list):
            if b[:len(a)] != a:
                changes.append("stages: the stages already run changed (only appending stages is allowed)")
            return
        if isinstance(a, Mapping) or isinstance(b, Mapping):  # a section left out = its defaults: compare keys
            a, b = a if isinstance(a, Mapping) else {}, b if isinstance(b, Mapping) else {}
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key), b.get(key), (*where, key))
        elif a != b:
            changes.append(f"{'.'.join(map(str, where))}: {a!r} -> {b!r}")

    walk(old, new, ())
    return changes
