"""Training building blocks (the winners' recipe): layer-wise LR decay, partial freezing, EMA, loss, schedule.

Layers come from the tower's library (`BackboneLibrary.block_of`, `is_embedding`): timm ViT/EVA (`blocks.N`), timm
and open_clip ConvNeXt (`stages.S.blocks.B`, with each stage's downsample before its first block) and open_clip ViT
(`transformer.resblocks.N`). Layer 0 is the embedding side (patch/stem, position and class embeddings), layers
1..L are the blocks in order, and layer L+1 is everything after them (final norm, projection) plus the head.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

log = logging.getLogger("kaggle_i2p")
BACKBONE = "backbone."  # a tower's backbone parameters; the rest is its head

def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """{parameter name: layer id} and the number of blocks L (ids run 0..L+1), for a tower: its library says which
    block each backbone parameter sits in and which belong to the input side."""
    lib = model.library
    names = [name for name, _ in model.named_parameters()]
    blocks = {name: lib.block_of(name[len(BACKBONE):]) for name in names if name.startswith(BACKBONE)}
    keys = sorted({key for key in blocks.values() if key is not None})
    position = {key: i + 1 for i, key in enumerate(keys)}
    ids = {}
    for name in names:
        key = blocks.get(name)
        if key is not None:
            ids[name] = position[key]
        elif name in blocks and lib.is_embedding(name[len(BACKBONE):]):
            ids[name] = 0
        else:
            ids[name] = len(keys) + 1  # final norm, projection, head
    return ids, len(keys)


def llrd_param_groups(model: nn.Module, lr: float, layer_decay: float, weight_decay: float = 0.05) -> list[dict]:
    """AdamW parameter groups: lr x layer_decay ** (L + 1 - layer id); no weight decay on biases, norms, embeddings
    (1-D tensors and position/class tokens). Frozen parameters are left out."""
    ids, n_blocks = layer_ids(model)
    lib = model.library
    if n_blocks == 0 and layer_decay != 1.0:
        log.warning("layer_decay %g: the %s library names no blocks of this backbone (it answers no layer-wise LR "
                    "decay), so the whole backbone trains at the stage's lr", layer_decay, lib.name)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or (name.startswith(BACKBONE) and lib.skips_weight_decay(name[len(BACKBONE):]))
        key = (ids[name], no_decay)
        if key not in groups:
            scale = layer_decay ** (n_blocks + 1 - ids[name])
            groups[key] = {"params": [], "names": [], "lr": lr * scale, "lr_scale": scale, "layer": ids[name],
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def freeze_lowest(model: nn.Module, n_blocks: int) -> int:
    """Freeze the embedding side and the lowest `n_blocks` blocks (layer ids <= n_blocks); returns tensors frozen."""
    ids, _ = layer_ids(model)
    frozen = 0
    for name, param in model.named_parameters():
        if ids[name] <= n_blocks and name.startswith("backbone."):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def set_head_only(model: nn.Module, head_only: bool) -> None:
    """Linear probing (LP) stage of LP-FT: only the head trains; False unfreezes everything."""
    for name, param in model.named_parameters():
        param.requires_grad_(not head_only or not name.startswith("backbone."))


class ModelEMA:
    """An exponential moving average of a model's weights, used for evaluation and export (decay e.g. 0.9998)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError("EMA decay must be in [0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int | None) -> float:
        """The decay used at optimizer step `step`: with warm-up, min(decay, (1 + step) / (10 + step)), so early
        averages are not dominated by the initial weights (the `num_updates` rule of TensorFlow's
        ExponentialMovingAverage; timm's ModelEmaV3 warms up with a power law instead); else the constant decay."""
        if not self.warmup or step is None:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        decay = self.decay_at(step)
        current = model.state_dict()
        for name, average in self.module.state_dict().items():
            if average.is_floating_point():
                average.mul_(decay).add_(current[name].detach(), alpha=1.0 - decay)
            else:  # integer buffers (BatchNorm's counter) follow the model
                average.copy_(current[name])


def cosine_embedding_loss(pred: torch.Tensor, target: torch.Tensor, margin: float = 0.0, negative_weight: float = 0.0,
                          mse_weight: float = 0.0) -> torch.Tensor:
    """1 - cos(pred_i, target_i) on average, plus optional in-batch negatives max(0, cos(pred_i, target_j) - margin)
    (torch's CosineEmbeddingLoss for y = 1 and y = -1) and a small MSE term between the unit vectors."""
    pred_unit = nn.functional.normalize(pred.float(), dim=-1)
    target_unit = nn.functional.normalize(target.float(), dim=-1)
    cos = pred_unit @ target_unit.T
    loss = (1.0 - cos.diagonal()).mean()
    if negative_weight > 0 and len(pred) > 1:
        off_diagonal = ~torch.eye(len(pred), dtype=torch.bool, device=pred.device)
        loss = loss + negative_weight * (cos[off_diagonal] - margin).clamp(min=0).mean()
    if mse_weight > 0:
        loss = loss + mse_weight * nn.functional.mse_loss(pred_unit, target_unit)
    return loss


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_scale: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 0, then a cosine down to `min_scale` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_scale + (1.0 - min_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(groups: list[dict], name: str, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """The stage's optimizer over our layer-decayed groups (each keeps its lr and weight decay): torch's AdamW, or
    timm's optimizer factory by name (MADGRAD, LAMB, Lion, ...; betas passed to those that take them)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    import timm.optim

    info = timm.optim.get_optimizer_info(name)
    extra = {"betas": betas} if info.has_betas else {}
    return timm.optim.create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=0.0, filter_bias_and_bn=False,
                                          **extra)
