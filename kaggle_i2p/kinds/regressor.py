"""The regressor kind: an image model with a head (Linear, or Linear-norm-activation-Linear) regressing the prompt
embedding. The default kind: an entry without `kind:` is one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from ..core.errors import EntryFieldError
from ..core.registry import register_kind
from ..core.validate import Problems, is_int
from ..manifest.fields import checked_fields, entry_field, entry_keys
from ..manifest.parse import ParseContext, parse_network
from ..manifest.schema import KindExample, NetworkSpec, TowerKind

HeadType = Literal["linear", "mlp", "none"]  # none: the backbone's output is the embedding (an exported tower)
HeadNorm = Literal["batchnorm", "layernorm", "none"]
HeadActivation = Literal["relu", "gelu"]
HEAD_TYPES: tuple[str, ...] = get_args(HeadType)
HEAD_NORMS: tuple[str, ...] = get_args(HeadNorm)
HEAD_ACTIVATIONS: tuple[str, ...] = get_args(HeadActivation)


@dataclass(frozen=True)
class HeadSpec:
    """The regression head on top of the backbone's pooled features: `linear`, or `mlp` (Linear-norm-act, once per
    hidden size, then the output Linear); `bias: false` leaves the output Linear without a bias (the 5th place's
    `Linear(n, 384, bias=False)`)."""

    type: HeadType = "linear"
    hidden: int | tuple[int, ...] | None = None  # one hidden size, or several for a deeper MLP
    norm: HeadNorm = "batchnorm"
    activation: HeadActivation = "relu"
    bias: bool = entry_field(True, hint="false: the output Linear has no bias")

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        """The hidden layers' widths, input side first (none for a linear head)."""
        if self.hidden is None:
            return ()
        return (self.hidden,) if isinstance(self.hidden, int) else tuple(self.hidden)

    def to_dict(self, out_dir: Path | None = None) -> dict:
        """As a manifest's `head:` section (`parse_head`'s input); a linear head is its type alone, and `bias` is
        written only when off."""
        data: dict[str, Any] = {"type": self.type if self.type == "none" else "linear"}
        if self.type == "mlp":
            hidden = self.hidden if isinstance(self.hidden, int) else list(self.hidden_sizes)
            data = {"type": self.type, "hidden": hidden, "norm": self.norm, "activation": self.activation}
        if not self.bias:
            data["bias"] = False
        return data


@dataclass(frozen=True, kw_only=True)
class RegressorSpec(NetworkSpec):
    """An image model with a head regressing the prompt embedding."""

    kind: ClassVar[str] = "regressor"
    head: HeadSpec = entry_field(HeadSpec(), section=HeadSpec)

    @property
    def head_name(self) -> str:
        return f"{self.head.type} head"


HEAD_KEYS = entry_keys(HeadSpec)


def parse_head(raw: Any, where: str, problems: Problems) -> HeadSpec:
    """A regressor's `head:` (or its type alone): checked from HeadSpec's marks, then `hidden`, which an mlp head
    needs and no other has."""
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, Mapping):
        problems.add(where, "must be a mapping like {type: linear} or {type: mlp, hidden: 1024}")
        return HeadSpec()
    values = checked_fields(HeadSpec, raw, where, problems, skip=("hidden",))
    hidden = tuple(raw["hidden"]) if isinstance(raw.get("hidden"), list) else raw.get("hidden")
    sizes = (hidden,) if not isinstance(hidden, tuple) else hidden
    if values["type"] == "mlp" and not (sizes and all(is_int(h) and h > 0 for h in sizes)):
        problems.add(f"{where}.hidden", "an mlp head needs a positive integer hidden size, e.g. hidden: 1024, or a "
                                        "list of them for a deeper MLP, e.g. hidden: [1024, 512]")
    if values["type"] in ("linear", "none") and hidden is not None:
        problems.add(f"{where}.hidden", f"a {values['type']} head has no hidden size; remove it or use type: mlp")
    return HeadSpec(**values, hidden=hidden)


def build_head(in_dim: int, spec: HeadSpec, out_dim: int):  # noqa: ANN201 - an nn.Module; torch loads lazily
    """The regression head the manifest declares: Linear, or (Linear -> norm -> activation) per hidden size ->
    Linear."""
    from torch import nn

    if spec.type == "none":
        if in_dim != out_dim:
            raise EntryFieldError(f"type none hands the backbone's output on as the embedding, but it is {in_dim} "
                                  f"wide, not {out_dim}; give the head a type", "head.type")
        return nn.Identity()
    if spec.type == "linear":
        return nn.Linear(in_dim, out_dim, bias=spec.bias)
    norm = {"batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm, "none": lambda _: nn.Identity()}[spec.norm]
    activation = {"relu": nn.ReLU, "gelu": nn.GELU}[spec.activation]
    layers, width = [], in_dim
    for hidden in spec.hidden_sizes:  # keys head.0, head.3, head.6, ...: one hidden size keeps the 0/3 layout
        layers += [nn.Linear(width, hidden), norm(hidden), activation()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, out_dim, bias=spec.bias))


class RegressorKind(TowerKind):
    """A backbone's pooled features through the regression head."""

    name = "regressor"
    spec = RegressorSpec
    reported_keys = frozenset({"retrieval"})

    def parse(self, raw: Mapping, name: str, label: str, ctx: ParseContext) -> RegressorSpec | None:
        return parse_network(raw, name, label, ctx, self, self._parse_head_section)

    @staticmethod
    def _parse_head_section(raw: Mapping, label: str, ctx: ParseContext) -> dict:
        if "retrieval" in raw:
            ctx.problems.add(f"{label}.retrieval", "only for kind: retrieval")
        return {"head": parse_head(raw.get("head", {"type": "linear"}), f"{label}.head", ctx.problems)}

    def example(self, folder: Path, out_dim: int, embedding_dim: int) -> KindExample:
        """An MLP head (the reference kind: every library's example is served through it)."""
        return KindExample({"head": {"type": "mlp", "hidden": 16, "norm": "layernorm", "activation": "gelu"}})

    def build_head(self, spec: RegressorSpec, in_dim: int, embedding_dim: int):  # noqa: ANN201
        return build_head(in_dim, spec.head, embedding_dim)


REGRESSOR = register_kind(RegressorKind())
