"""The retrieval kind: an image model whose scores select texts of a bank (kNN regression), the 2nd place's CLIP
retrieval and the classifier-as-retriever. Two ways to score:

- `logits`: a classifier whose classes are the bank's rows; its head takes the soft top-k of the rows per batch.
- `embedding`: a query in the bank keys' space (a CLIP image embedding against CLIP text keys). The forward passes
  give unit queries, which the cache stores; once every image is encoded, one pass over the bank (or its FAISS
  index) turns them into embeddings: this kind's step after encoding.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch

from ..bank.folder import (
    DEFAULT_INVERSE_EPS,
    DEFAULT_INVERSE_POWER,
    DEFAULT_RETRIEVAL_K,
    DEFAULT_RETRIEVAL_TEMPERATURE,
    WEIGHTINGS,
    Bank,
    BankError,
    read_bank_meta,
    retrieve,
    retrieve_from_logits,
    write_bank,
)
from ..bank.search import INDEX_FILE, index_content_problem, index_header_problem, read_index
from ..core.errors import EntryFieldError, InputFileError
from ..core.fileio import npy_header
from ..core.registry import register_kind
from ..core.validate import expanded_path
from ..manifest.fields import checked_fields, entry_dict, entry_field
from ..manifest.parse import ParseContext, parse_network
from ..manifest.schema import EncodingContext, KindExample, NetworkSpec, OutputSpec, TowerKind
from ..models.checkpoints import content_identity

Score = Literal["logits", "embedding"]
Search = Literal["exact", "index"]
SCORES: tuple[str, ...] = get_args(Score)
SEARCHES: tuple[str, ...] = get_args(Search)


Weighting = Literal[WEIGHTINGS]  # type: ignore[valid-type]


@dataclass(frozen=True, kw_only=True)
class RetrievalOptions:
    """A retrieval tower's `retrieval:` section: its bank and how its scores become an embedding (soft top-k). Its
    marks check the section; what depends on the bank and on other keys is `parse_retrieval_section`'s."""

    bank: Path = entry_field(path=True, required="the folder written by `kaggle-i2p build-bank`")
    k: int = entry_field(DEFAULT_RETRIEVAL_K, bounds=(1, None), hint="texts averaged per image")
    temperature: float = entry_field(DEFAULT_RETRIEVAL_TEMPERATURE, low_open=True)
    # logits: a classifier whose classes are the bank's rows; embedding: queries in the keys' space
    score: Score = "logits"
    rows: int = entry_field(written=False)  # read from the bank
    key_dim: int | None = entry_field(written=False)  # the bank's key width (None: a class bank without keys)
    search: Search = entry_field("exact", sparse=True)  # embedding scores: one exact pass, or the bank's FAISS index
    # index search: inverted lists visited per query (None: the bank's measured default)
    nprobe: int | None = entry_field(None, bounds=(1, None), hint="inverted lists visited per query")
    # index search: rows proposed per query, then scored exactly (None: 8 x k)
    candidates: int | None = entry_field(None, bounds=(1, None), hint="rows the index proposes per query")
    weighting: Weighting = entry_field("softmax", sparse=True)  # softmax(score / temperature), or inverse (cosines)
    # inverse: 1 / ((1 - cos) ** power + eps)
    power: float = entry_field(DEFAULT_INVERSE_POWER, sparse=True, low_open=True)
    eps: float = entry_field(DEFAULT_INVERSE_EPS, sparse=True, low_open=True)

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
        return entry_dict(self, out_dir)


@dataclass(frozen=True, kw_only=True)
class RetrievalSpec(NetworkSpec):
    """An image model whose scores (class logits, or an embedding) select texts of a bank: no head of its own."""

    kind: ClassVar[str] = "retrieval"
    retrieval: RetrievalOptions = entry_field(section=RetrievalOptions)

    @property
    def head_name(self) -> str:
        return "retrieval head (no parameters)"

    def _describe_output(self) -> str:
        options = self.retrieval
        search = f", {options.search} search" if options.searches_bank else ""
        weighting = (f"inverse weighting (power {options.power:g}, eps {options.eps:g})"
                     if options.weighting == "inverse" else f"temperature {options.temperature:g}")
        return (f"retrieval by {options.score} over {options.rows} bank rows ({options.bank}){search}, "
                f"k={options.k}, {weighting}")


class ScoreWidthError(BankError, EntryFieldError):
    """A retrieval tower whose network gives another number of scores than its bank needs."""

    field = "retrieval"


class RetrievalHead(torch.nn.Module):
    """A retrieval tower's head. Class logits: the softmax-weighted mean of the top-k bank targets, per batch (only
    k rows are read). Embeddings: the unit query, which `search_bank` turns into the embedding once per run, with one
    pass over the bank for every image. No parameters: a tower checkpoint holds only the backbone."""

    def __init__(self, options: RetrievalOptions):
        super().__init__()
        self.options = options
        self.bank = Bank.open(options.bank)  # memory-mapped: nothing is read until a query scores it

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, rows) class logits -> (B, D) unit embeddings; (B, key_dim) -> (B, key_dim) unit queries; float32."""
        options = self.options
        if scores.shape[-1] != options.score_dim:
            raise ScoreWidthError(f"the network outputs {tuple(scores.shape)}, expected (1, {options.score_dim}) "
                                  "(the bank's rows or key size)")
        if options.searches_bank:
            return torch.nn.functional.normalize(scores.float(), dim=-1)
        if scores.is_meta:
            return torch.empty(len(scores), self.bank.targets.shape[1], device="meta")
        with torch.autocast(scores.device.type, enabled=False):
            out = retrieve_from_logits(scores.float(), self.bank.targets, options.k, options.temperature)
        return torch.from_numpy(out).to(scores.device)


def search_bank(options: RetrievalOptions, queries: np.ndarray, device: str | torch.device = "cpu",
                progress: bool = False) -> np.ndarray:
    """A retrieval tower's bank pass: every query of the run (all images, all views) against its bank at once,
    exactly or through the bank's index (`options.search`); (Q, D) float32 unit embeddings."""
    bank = Bank.open(options.bank)
    index, nprobe = None, options.nprobe
    if options.search == "index":
        index = read_index(bank.path)
        nprobe = nprobe or bank.meta.get("index", {}).get("nprobe")
    return retrieve(queries, bank, options.k, options.temperature, device, index=index, nprobe=nprobe,
                    candidates=options.candidates, progress=progress, weighting=options.weighting,
                    power=options.power, eps=options.eps)


def bank_identity(bank: Path) -> dict:
    """A retrieval bank's files by content (sha256, memoised per file by path, size, times and inode)."""
    return content_identity(bank)


class RetrievalKind(TowerKind):
    """A backbone's scores against a bank of texts."""

    name = "retrieval"
    spec = RetrievalSpec
    reported_keys = frozenset({"head"})

    def parse(self, raw: Mapping, name: str, label: str, ctx: ParseContext) -> RetrievalSpec | None:
        return parse_network(raw, name, label, ctx, self, self._parse_section)

    def example(self, folder: Path, out_dim: int, embedding_dim: int) -> KindExample:
        """A 40-row bank of random texts keyed in the backbone's feature space, searched by embedding."""
        rng = np.random.default_rng(0)
        write_bank(Path(folder) / "bank", [f"text {i}" for i in range(40)], rng.standard_normal((40, embedding_dim)),
                   keys=rng.standard_normal((40, out_dim)))
        return KindExample({"kind": "retrieval", "retrieval": {"bank": "bank", "k": 4, "temperature": 0.1,
                                                                "score": "embedding"}})

    def output(self, spec: RetrievalSpec, embedding_dim: int) -> OutputSpec:
        """Queries in the keys' space for a bank searched after encoding; else the embedding itself."""
        return OutputSpec(spec.retrieval.score_dim if spec.retrieval.searches_bank else embedding_dim)

    @staticmethod
    def _parse_section(raw: Mapping, label: str, ctx: ParseContext) -> dict:
        if "head" in raw:
            ctx.problems.add(f"{label}.head", "a retrieval tower has no head: its scores select bank rows")
        if "retrieval" not in raw:
            ctx.problems.add(f"{label}.retrieval", "is required")
            return {"retrieval": None}
        return {"retrieval": parse_retrieval_section(raw["retrieval"], f"{label}.retrieval", ctx)}

    def backbone_outputs(self, spec: RetrievalSpec) -> int:
        """A classifier ends in one logit per bank row; an embedding tower gives its pooled embedding."""
        return spec.retrieval.rows if spec.retrieval.score == "logits" else 0

    def build_head(self, spec: RetrievalSpec, in_dim: int, embedding_dim: int) -> RetrievalHead:
        return RetrievalHead(spec.retrieval)

    def deep_problems(self, spec: RetrievalSpec, label: str) -> list[str]:
        """The bank index a run will search, checked whole (its sha256 against bank.json's, or read by FAISS), so a
        damaged index is a manifest problem before any weight loads, never a failure after the encoding."""
        options = spec.retrieval
        if not options.searches_bank or options.search != "index":
            return []
        try:
            problem = index_content_problem(options.bank, read_bank_meta(options.bank).get("index") or {})
        except (BankError, OSError) as err:
            problem = str(err)
        if problem is None:
            return []
        return [f"{label}.retrieval.search: {options.bank}/{INDEX_FILE} {problem}; rebuild it with "
                f"`kaggle-i2p index-bank {options.bank}`"]

    def cache_identity(self, spec: RetrievalSpec, entry: dict) -> dict:
        """A tower that searches its bank stores queries, made before the bank pass: its bank, k and search
        settings are not part of its outputs; a classifier's outputs are its bank's rows, so the bank's files are."""
        options = spec.retrieval
        section = ({"score": options.score, "key_dim": options.key_dim} if options.searches_bank
                   else {**entry["retrieval"], "bank": bank_identity(options.bank)})
        return {**entry, "retrieval": section}

    def has_step_after_encoding(self, spec: RetrievalSpec) -> bool:
        return spec.retrieval.searches_bank

    def after_encoding(self, spec: RetrievalSpec, outputs: np.ndarray, context: EncodingContext) -> np.ndarray:
        """The bank pass: every query of the run against the bank at once (or through its index)."""
        return search_bank(spec.retrieval, outputs, context.device, context.progress)


def parse_retrieval_section(raw: Any, where: str, ctx: ParseContext) -> RetrievalOptions | None:
    """The `retrieval:` section: its keys checked from RetrievalOptions' marks, then the bank's files (headers
    only) and the options that depend on each other."""
    problems, before = ctx.problems, ctx.problems.mark()
    if not isinstance(raw, Mapping):
        problems.add(where, "must be a mapping with bank, k, temperature, score")
        return None
    values = checked_fields(RetrievalOptions, raw, where, problems, skip=("bank",))
    shapes = _bank_shapes(raw.get("bank"), where, ctx)
    if problems.blocking_since(before) or shapes is None:
        return None
    bank, rows, keys = shapes
    score, search, weighting = values["score"], values["search"], values["weighting"]
    if score == "embedding" and keys is None:
        problems.add(f"{where}.score", f"embedding scores need {bank}/keys.npy (a bank built with keys)")
    for option in ("nprobe", "candidates"):
        if option in raw and search != "index":
            problems.add(f"{where}.{option}", "only for search: index")
    for option in ("power", "eps"):
        if option in raw and weighting != "inverse":
            problems.add(f"{where}.{option}", "only for weighting: inverse")
    if weighting == "inverse" and score != "embedding":
        problems.add(f"{where}.weighting", "inverse weighs cosines: it needs score: embedding (class logits are no "
                                           "cosines; use softmax with a temperature)")
    if search == "index" and (problem := _index_problem(bank, keys, score)) is not None:
        problems.add(f"{where}.search", problem)
    return RetrievalOptions(**values, bank=bank, rows=rows, key_dim=None if keys is None else keys[1])


def _bank_shapes(raw_bank: Any, where: str, ctx: ParseContext) -> tuple[Path, int, tuple[int, int] | None] | None:
    """(the bank folder, its rows, the (rows, width) of its keys or None) from the arrays' headers and sizes only: a
    truncated or damaged array is a problem here, never after the compute; None when it cannot be used."""
    problems = ctx.problems
    if not isinstance(raw_bank, str):
        problems.add(f"{where}.bank", "is required: the folder written by `kaggle-i2p build-bank`")
        return None
    bank = expanded_path(raw_bank, ctx.base_dir, f"{where}.bank", problems)
    if bank is None:
        return None
    if not (bank / "targets.npy").is_file():
        problems.add(f"{where}.bank", f"{bank} is not a bank folder (no targets.npy); build it with "
                                      "`kaggle-i2p build-bank`")
        return None
    try:
        targets_shape, _ = npy_header(bank / "targets.npy", "bank targets")
        keys_shape = npy_header(bank / "keys.npy", "bank keys")[0] if (bank / "keys.npy").is_file() else None
    except InputFileError as err:
        problems.add(f"{where}.bank", f"{err}; rebuild the bank with `kaggle-i2p build-bank`")
        return None
    if len(targets_shape) != 2 or targets_shape[1] != ctx.embedding_dim:
        problems.add(f"{where}.bank", f"{bank}/targets.npy has shape {targets_shape}; expected (rows, "
                                      f"{ctx.embedding_dim})")
        return None
    if keys_shape is not None and (len(keys_shape) != 2 or keys_shape[0] != targets_shape[0]):
        problems.add(f"{where}.bank", f"{bank}/keys.npy has shape {keys_shape}; expected ({targets_shape[0]}, "
                                      "key width): one row per text")
        keys_shape = None
    return bank, int(targets_shape[0]), None if keys_shape is None else (int(keys_shape[0]), int(keys_shape[1]))


def _stale_index(bank: Path, keys: tuple[int, int]) -> str | None:
    """Why the bank's index does not belong to its keys (checked before any compute), or None."""
    from ..bank.search import INDEX_FILE

    try:
        entry = json.loads((bank / "bank.json").read_text(encoding="utf-8")).get("index") or {}
    except (OSError, ValueError):
        return "has no entry in bank.json to check it against"

    if (problem := index_header_problem(bank / INDEX_FILE, *keys)) is not None:
        return problem
    actual = {"rows": keys[0], "dim": keys[1], "bytes": (bank / INDEX_FILE).stat().st_size}
    differ = [f"{name} {entry.get(name)} (now {value})" for name, value in actual.items() if entry.get(name) != value]
    return f"was built for other keys or was changed: bank.json says {', '.join(differ)}" if differ else None


def _index_problem(bank: Path, keys: tuple[int, int] | None, score: str) -> str | None:
    """Why `search: index` cannot run: it needs embedding scores, the bank's index file (built for these keys) and
    FAISS; None when it can."""
    if score != "embedding":
        return "an index searches keys: it needs score: embedding"
    if not (bank / INDEX_FILE).is_file():
        return (f"{bank} has no {INDEX_FILE}; build the bank with `kaggle-i2p build-bank --index ivf-pq`, or use "
                "search: exact")
    if keys is not None and (stale := _stale_index(bank, keys)) is not None:
        return f"{bank}/{INDEX_FILE} {stale}; rebuild it with `kaggle-i2p index-bank {bank}`"
    if importlib.util.find_spec("faiss") is None:
        return ("an index search needs FAISS, which is not installed: pip install 'kaggle_i2p[index]' (faiss-cpu), "
                "or use search: exact")
    return None


RETRIEVAL = register_kind(RetrievalKind())
