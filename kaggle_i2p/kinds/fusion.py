"""The fusion kind: a learned head over other towers' results, concatenated in a declared order (one public solution
fused a CLIP embedding, a ConvNeXt's pooled features and the MiniLM vector of a caption in one MLP). Its inputs are
towers of the manifest, run and cached as any tower (whatever their weight); the fusion itself is computed once
every tower is, from each input's result:

- `output: embedding` (the default): the tower's embedding, its views combined and normalised (a regressor's, a
  caption tower's MiniLM vector, a retrieval tower's);
- `output: features`: a `kind: features` tower's pooled features, the mean over its views (not normalised).

    - name: fused
      kind: fusion
      inputs: [clip_l, {tower: convnext_pool, output: features}, blip_caption]
      head: {type: mlp, hidden: 1024, norm: batchnorm, activation: relu}
      checkpoint: fusion_head.safetensors      # the head's keys (`head.0.weight`, ...; or its own, `0.weight`)
      weight: 1.0
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch

from ..core.registry import register_kind
from ..core.validate import Problems
from ..manifest.fields import entry_dict, entry_field, entry_keys
from ..manifest.parse import ParseContext, parse_checkpoint, parse_dim_weights, parse_weight
from ..manifest.schema import KindExample, NetworkSpec, TowerKind, TowerSpec, kind_of
from .regressor import HeadSpec, build_head, parse_head

Output = Literal["embedding", "features"]
OUTPUTS: tuple[str, ...] = get_args(Output)


@dataclass(frozen=True)
class FusionInput:
    """One input of a fusion tower: which tower, and which of its results."""

    tower: str
    output: Output = entry_field("embedding", sparse=True)

    def to_dict(self, out_dir: Path | None = None) -> dict:
        return entry_dict(self, out_dir)


@dataclass(frozen=True, kw_only=True)
class FusionSpec(TowerSpec):
    """A head over other towers' embeddings and features, concatenated in the order of `inputs`."""

    kind: ClassVar[str] = "fusion"
    inputs: tuple[FusionInput, ...]
    head: HeadSpec = entry_field(HeadSpec(), section=HeadSpec)
    checkpoint: Path | tuple[Path, ...] = entry_field(path=True, identity=False)
    sha256: str | None = entry_field(None, identity=False)
    in_dim: int = entry_field(0, written=False)  # the inputs' widths added, from the manifest's towers
    out_dim: int = entry_field(0, written=False)  # the manifest's embedding_dim

    def to_dict(self, out_dir: Path | None = None) -> dict:
        data = super().to_dict(out_dir)
        data["inputs"] = [i.tower if i.output == "embedding" else i.to_dict() for i in self.inputs]
        return data

    def describe(self) -> str:
        parts = ", ".join(i.tower + ("" if i.output == "embedding" else " (features)") for i in self.inputs)
        return f"fusion of {parts} ({self.in_dim} wide) through a {self.head.type} head, weight {self.weight:g}"


class FusionKind(TowerKind):
    """A head over other towers' results."""

    name = "fusion"
    spec = FusionSpec

    def parse(self, raw: Mapping, name: str, label: str, ctx: ParseContext) -> FusionSpec | None:
        problems, before = ctx.problems, ctx.problems.mark()
        problems.unknown_keys(raw, entry_keys(FusionSpec), label, what="key for a fusion tower")
        for key in ("inputs", "checkpoint", "weight"):
            if key not in raw:
                problems.add(f"{label}.{key}", "is required")
        inputs = _parse_inputs(raw.get("inputs"), f"{label}.inputs", problems) if "inputs" in raw else ()
        head = parse_head(raw.get("head", {"type": "linear"}), f"{label}.head", problems)
        if head.type == "none":
            problems.add(f"{label}.head.type", "a fusion tower is its head: linear or mlp")
        checkpoint = parse_checkpoint(raw, label, ctx)
        sha256 = raw.get("sha256")
        if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha256)):
            problems.add(f"{label}.sha256", "must be 64 hex digits (`sha256sum FILE`), in quotes, or left out")
        weight = parse_weight(raw, label, problems)
        dim_weights, dim_weights_path = parse_dim_weights(raw, label, ctx)
        if problems.blocking_since(before) or checkpoint is None:
            return None
        return FusionSpec(name=name, weight=weight, dim_weights=dim_weights, dim_weights_path=dim_weights_path,
                          inputs=inputs, head=head, checkpoint=checkpoint, sha256=sha256)

    def reads(self, spec: FusionSpec) -> tuple[str, ...]:
        return tuple(i.tower for i in spec.inputs)

    def resolve(self, spec: FusionSpec, towers: Mapping[str, TowerSpec], label: str, embedding_dim: int,
                problems: Problems) -> FusionSpec:
        """Each input against the tower it names (features only of a features tower, an embedding only of a tower
        that gives one, never another fusion), and the head's input width: the inputs' widths added."""
        width = 0
        for number, item in enumerate(spec.inputs):
            other = towers[item.tower]
            where = f"{label}.inputs[{number}]"
            other_kind = kind_of(other)
            if other_kind.combines(other):
                problems.add(where, f"{item.tower!r} is a fusion tower itself: fuse the towers it reads instead")
            elif item.output == "features" and other_kind.gives_embeddings(other):
                problems.add(where, f"{item.tower!r} gives an embedding, not features: read its embedding "
                                    "(output: embedding), or declare its backbone as a tower of kind: features")
            elif item.output == "embedding" and not other_kind.gives_embeddings(other):
                problems.add(where, f"{item.tower!r} is a features tower: read it with output: features")
            elif item.output == "features" and isinstance(other, NetworkSpec):
                width += other.forward_dim(embedding_dim)
            else:
                width += embedding_dim
        return replace(spec, in_dim=width, out_dim=embedding_dim)

    def combines(self, spec: FusionSpec) -> bool:
        return True

    def example(self, folder: Path, out_dim: int, embedding_dim: int) -> KindExample:
        """A fusion over a tiny regressor named "input" (put beside it), through an MLP head of its own file."""
        return KindExample(example_entry(folder, "tiny", ["input"], embedding_dim, embedding_dim), reads_input=True)

    def head_state(self, spec: FusionSpec, embedding_dim: int) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The head built on the meta device and the checkpoint's tensors under its own keys (`head.` removed when
        the file has it), for the check and the load."""
        from ..models.checkpoints import read_weights

        with torch.device("meta"):
            module = build_head(spec.in_dim, spec.head, embedding_dim)
        state = read_weights(spec.checkpoint, f"tower {spec.name!r}: cannot read its head")
        if state and all(k.startswith("head.") for k in state):
            state = {k[len("head."):]: v for k, v in state.items()}
        return module, state

    def deep_problems(self, spec: FusionSpec, label: str) -> list[str]:
        """The head's checkpoint (its sha256, and its keys and shapes against the head the inputs' widths make)."""
        from ..models.checkpoints import checkpoint_shapes, key_diff, sha256_mismatch

        actual = sha256_mismatch(spec.checkpoint, spec.sha256)
        if actual:
            return [f"{label}.sha256: the head's file has sha256 {actual}, the manifest says {spec.sha256}"]
        try:
            shapes = checkpoint_shapes(spec.checkpoint)
        except Exception as err:  # noqa: BLE001 - an unreadable file is one problem line
            return [f"{label}.checkpoint: cannot read the head's file: {err}"]
        if shapes and all(k.startswith("head.") for k in shapes):
            shapes = {k[len("head."):]: v for k, v in shapes.items()}
        with torch.device("meta"):
            expected = build_head(spec.in_dim, spec.head, spec.out_dim).state_dict()
        diff = key_diff(expected, shapes)
        return [f"{label}.checkpoint: the head's file does not match a {spec.head.type} head from {spec.in_dim} "
                f"inputs:\n      " + "\n      ".join(diff)] if diff else []

    def combine(self, spec: FusionSpec, embeddings: Mapping[str, np.ndarray], features: Mapping[str, np.ndarray],
                device: str | torch.device) -> np.ndarray:
        """The inputs concatenated in order through the head, on `device`; unit rows (non-finite where an input's
        row is)."""
        parts = [features[i.tower] if i.output == "features" else embeddings[i.tower] for i in spec.inputs]
        stacked = torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32))
        module, state = self.head_state(spec, spec.out_dim)
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        module = module.to(device).eval()
        with torch.no_grad():
            out = module(stacked.to(device)).float().cpu().numpy()
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _parse_inputs(raw: Any, where: str, problems: Problems) -> tuple[FusionInput, ...]:
    """`inputs`: tower names (their embeddings), or {tower, output} mappings, in the order the head was trained on."""
    if not isinstance(raw, list) or not raw:
        problems.add(where, "must be a list of the towers the head reads, in its training order, e.g. [clip_l, "
                            "{tower: convnext_pool, output: features}]")
        return ()
    out = []
    for number, item in enumerate(raw):
        item = {"tower": item} if isinstance(item, str) else item
        if not isinstance(item, Mapping) or not isinstance(item.get("tower"), str):
            problems.add(f"{where}[{number}]", f"{item!r} must be a tower's name, or {{tower: NAME, output: "
                                               "embedding|features}")
            continue
        problems.unknown_keys(item, entry_keys(FusionInput), f"{where}[{number}]")
        output = item.get("output", "embedding")
        if output not in OUTPUTS:
            problems.add(f"{where}[{number}].output", f"{output!r} is not one of {', '.join(OUTPUTS)}")
            continue
        out.append(FusionInput(item["tower"], output))
    return tuple(out)


def example_entry(folder: Path, name: str, inputs: list, in_dim: int, embedding_dim: int) -> dict:
    """A fusion entry over `inputs` whose MLP head (random weights) is saved in its own file, as the head's own
    module saves it."""
    from safetensors.torch import save_file

    head = HeadSpec(type="mlp", hidden=24, norm="layernorm", activation="gelu")
    torch.manual_seed(11)
    module = build_head(in_dim, head, embedding_dim)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(Path(folder) / f"{name}.safetensors"))
    return {"name": name, "kind": "fusion", "inputs": inputs, "checkpoint": f"{name}.safetensors", "weight": 1.0,
            "head": head.to_dict()}


FUSION = register_kind(FusionKind())
