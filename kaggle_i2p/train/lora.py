"""LoRA stages through `peft` (the 1st place's recipe: the lowest blocks frozen, a middle range trained through
low-rank adapters, the top fully): adapters injected into the tower's own modules, merged back at the stage's end
and at export, so the served tower is a plain tower at plain speed.

The adapters go on every `nn.Linear` and `nn.MultiheadAttention` (open_clip's attention, which peft adapts as a
whole) inside the stage's block range, or on those whose names end with one of `modules`. They are injected with
`peft.inject_adapter_in_model` into the backbone in place (the tower is never a `PeftModel`), under a seed of their
own, so a resumed run builds the very same adapters. Checkpoints keep a plain tower's keys (`model`, `ema`: the
frozen base weights) and the adapters beside them (`adapters`), from which `merged_weights` rebuilds the tower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..manifest.fields import entry_field
from .recipe import BACKBONE, layer_ids

BASE = ".base_layer"  # peft's name for the wrapped module: a plain tower's key without it
ADAPTER = "lora_"  # every adapter tensor's name has it (lora_A, lora_B, lora_embedding_*)


@dataclass(frozen=True)
class LoraSpec:
    """A stage's `lora:` section: the block range (1-based, inclusive, or fractions of the blocks), rank, alpha,
    dropout, and optionally the module-name endings to adapt."""

    blocks: tuple[float, float]  # checked by the config's parser: whole block numbers or fractions
    rank: int = entry_field(16, bounds=(1, None))
    alpha: float = 16.0
    dropout: float = entry_field(0.0, bounds=(0.0, 1.0), high_open=True)
    modules: tuple[str, ...] | None = entry_field(None, hint="module-name endings, e.g. [qkv, fc1, fc2]")


@dataclass(frozen=True)
class Adapters:
    """The adapters a tower carries: which backbone modules, with what rank, alpha, dropout and seed. As a dict
    (`asdict`) it is what checkpoints record, and `Adapters(**d)` reads it back."""

    targets: tuple[str, ...]
    rank: int
    alpha: float
    dropout: float
    seed: int

    def peft_config(self):
        """The peft LoraConfig injecting exactly these adapters."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.targets), bias="none")


def block_range(blocks: tuple[float, float], n_blocks: int) -> tuple[int, int]:
    """(first, last) block numbers, 1..n_blocks: whole numbers as they are; fractions (floats in [0, 1]) as the
    blocks above the lowest `low` and up to the lowest `high` of them (`[0.4, 0.8]`: the 1st place's middle 40%)."""
    low, high = blocks
    if isinstance(low, int) and isinstance(high, int):
        return low, high
    return math.floor(round(low * n_blocks, 6)) + 1, math.floor(round(high * n_blocks, 6))


def adapter_targets(tower: nn.Module, first: int, last: int, modules: tuple[str, ...] | None = None
                    ) -> tuple[str, ...]:
    """The backbone modules of blocks first..last that get adapters: every Linear and MultiheadAttention (not the
    MultiheadAttention's own out_proj, which its forward never calls), or those whose names end with `modules`."""
    ids, _ = layer_ids(tower)
    modules_by_name = dict(tower.backbone.named_modules())
    targets = []
    for name in _adaptable(tower):
        module = modules_by_name[name]
        if modules is not None and not any(name == m or name.endswith(f".{m}") for m in modules):
            continue
        weight = next((f"{BACKBONE}{name}.{p}" for p, _ in module.named_parameters(recurse=False)), None)
        if weight is None:
            weight = next(f"{BACKBONE}{name}.{p}" for p, _ in module.named_parameters())
        if first <= ids[weight] <= last:
            targets.append(name)
    return tuple(targets)


def _adaptable(tower: nn.Module) -> list[str]:
    """The backbone's modules an adapter can go on (Linear, MultiheadAttention), by name."""
    attention = {name for name, m in tower.backbone.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return [name for name, m in tower.backbone.named_modules()
            if isinstance(m, (nn.Linear, nn.MultiheadAttention)) and name.rpartition(".")[0] not in attention]


def adapter_problems(tower: nn.Module, stages: list[tuple[int, LoraSpec]], arch: str) -> list[str]:
    """Each LoRA stage's block range against the tower's blocks, and its `modules` against the tower's module names
    (a name that matches nothing anywhere, or none in the range), all at once; `tower` built on the meta device."""
    _, n_blocks = layer_ids(tower)
    names = _adaptable(tower)
    endings = sorted({n.rsplit(".", 1)[-1] for n in names})
    problems = []
    for index, lora in stages:
        where = f"stages[{index}].lora"
        first, last = block_range(lora.blocks, n_blocks)
        unknown = [m for m in lora.modules or () if not any(n == m or n.endswith(f".{m}") for n in names)]
        if unknown:
            problems.append(f"{where}.modules: {', '.join(map(repr, unknown))} name(s) no Linear or "
                            f"MultiheadAttention module of {arch} (its names end in {', '.join(endings[:12])}"
                            f"{' ...' if len(endings) > 12 else ''})")
        if not 1 <= first <= last <= n_blocks:
            problems.append(f"{where}.blocks: {list(lora.blocks)} gives blocks {first}..{last}, but {arch} has "
                            f"blocks 1..{n_blocks}")
        elif not unknown and not adapter_targets(tower, first, last, lora.modules):
            problems.append(f"{where}: blocks {first}..{last} hold no Linear or MultiheadAttention module"
                            + (f" named {', '.join(lora.modules)}" if lora.modules else "")
                            + "; set lora.modules to module names of those blocks")
    return problems


def add_adapters(tower: nn.Module, adapters: Adapters) -> None:
    """Inject the adapters into `tower.backbone` in place, initialised under their own seed (the global RNG is left
    as it was, so a resumed run draws what the uninterrupted one drew)."""
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(adapters.seed)
        inject_adapter_in_model(adapters.peft_config(), tower.backbone)


def set_trainable(tower: nn.Module, last: int) -> tuple[int, int]:
    """The stage's trainable parameters: the adapters, every backbone parameter above block `last`, and the head;
    returns (trainable, total) parameter counts (the adapters counted, the frozen base in the total)."""
    ids, _ = layer_ids(tower)
    trainable = total = 0
    for name, param in tower.named_parameters():
        on = ADAPTER in name or not name.startswith(BACKBONE) or ids[name] > last
        param.requires_grad_(on)
        trainable += param.numel() if on else 0
        total += param.numel()
    return trainable, total


def merge_adapters(module: nn.Module) -> bool:
    """Merge every adapter into its base weights and put the plain module back (peft's own per-layer merge, as its
    `merge_and_unload` does); returns whether there were any."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [name for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    outer = [name for name in layers if not any(name.startswith(f"{other}.") for other in layers)]
    for name in outer:
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        layer = getattr(parent, attribute)
        if hasattr(layer, "unload_and_optionally_merge_module"):  # MultiheadAttention's own way out
            plain = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        else:
            layer.merge(safe_merge=True)
            plain = layer.get_base_layer()
        setattr(parent, attribute, plain)
    if hasattr(module, "peft_config"):
        del module.peft_config
    return bool(outer)


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A state dict with adapters as (a plain tower's keys: the base weights; the adapter tensors)."""
    plain = {k.replace(BASE, ""): v for k, v in state.items() if ADAPTER not in k}
    return plain, {k: v for k, v in state.items() if ADAPTER in k}


def join_state(tower: nn.Module, plain: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """The state dict of `tower` (adapters injected) from a checkpoint's plain part and adapters."""
    names = {k.replace(BASE, ""): k for k in tower.state_dict() if ADAPTER not in k}
    return {**{names[k]: v for k, v in plain.items()}, **adapters}


def merged_weights(tower: nn.Module, plain: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor],
                   recorded: Mapping) -> dict[str, torch.Tensor]:
    """A plain tower's weights from a checkpoint's base weights and adapters: injected into `tower` (already holding
    the architecture), loaded, merged by peft."""
    add_adapters(tower, Adapters(**{**recorded, "targets": tuple(recorded["targets"])}))
    tower.load_state_dict(join_state(tower, plain, adapters), strict=True)
    merge_adapters(tower.backbone)
    return {k: v.detach() for k, v in tower.state_dict().items()}


def record(adapters: Adapters) -> dict:
    """What a checkpoint keeps of the adapters' layout (lists and numbers: `weights_only` loads it)."""
    return {**asdict(adapters), "targets": list(adapters.targets)}
