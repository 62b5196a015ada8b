"""Retrieval (kNN regression) over a bank of texts: the prompt embedding as a soft average of the nearest texts'.

A bank is a folder: `texts.txt` (one text per line), `targets.npy` (N x 384 float16, the texts' all-MiniLM-L6-v2 unit
embeddings), optionally `keys.npy` (N x d float16, the score side, e.g. CLIP text embeddings) and `bank.json`. Arrays
are memory-mapped and scored chunk by chunk with a running top-k, so a bank of millions of rows never needs an
N x batch score matrix or the whole bank in memory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .ensemble import l2_normalize
from .errors import I2PError
from .fileio import replace_dir, staging_dir
from .manifest import DEFAULT_RETRIEVAL_K, DEFAULT_RETRIEVAL_TEMPERATURE, RetrievalOptions

DEFAULT_CHUNK_ROWS = 65_536


class BankError(I2PError, ValueError):
    """A bank folder that is missing files or whose files disagree."""


@dataclass
class Bank:
    """An opened bank: memory-mapped targets (and keys), with the texts file beside them."""

    path: Path
    targets: np.ndarray  # (N, D) float16, memory-mapped
    keys: np.ndarray | None  # (N, d) float16, memory-mapped; None for a classifier's class bank
    meta: dict

    def __len__(self) -> int:
        return len(self.targets)

    def texts(self, rows: Sequence[int]) -> list[str]:
        """The texts of the given rows (reads the texts file once, line by line)."""
        wanted = {int(r): None for r in rows}
        with open(self.path / "texts.txt", encoding="utf-8") as handle:
            for i, line in enumerate(handle):
                if i in wanted:
                    wanted[i] = line.rstrip("\n")
        return [wanted[int(r)] for r in rows]

    @classmethod
    def open(cls, path: str | Path) -> Bank:
        path = Path(path)
        if not (path / "targets.npy").is_file():
            raise BankError(f"{path}: not a bank (no targets.npy); build one with `kaggle-i2p build-bank`")
        targets = np.load(path / "targets.npy", mmap_mode="r")
        keys = np.load(path / "keys.npy", mmap_mode="r") if (path / "keys.npy").is_file() else None
        meta = json.loads((path / "bank.json").read_text()) if (path / "bank.json").is_file() else {}
        if targets.ndim != 2 or (keys is not None and (keys.ndim != 2 or len(keys) != len(targets))):
            raise BankError(f"{path}: targets {targets.shape} and keys {None if keys is None else keys.shape} "
                            "must be 2-D with one row per text")
        return cls(path, targets, keys, meta)


BANK_MARKER = "bank.json"


def check_bank_destination(out_dir: str | Path) -> Path:
    """A bank may be written to a new folder or over a bank we wrote (it holds bank.json); anything else is refused
    before any work, and nothing in it is touched."""
    out_dir = Path(out_dir)
    if out_dir.is_file() or (out_dir.is_dir() and not (out_dir / BANK_MARKER).is_file() and any(out_dir.iterdir())):
        raise BankError(f"{out_dir} exists and is not a bank (no {BANK_MARKER}); build-bank replaces only a bank it "
                        "wrote: choose a new folder for --out, or remove this one yourself")
    return out_dir


def write_bank(out_dir: str | Path, texts: Sequence[str], targets: np.ndarray, keys: np.ndarray | None = None,
               meta: dict | None = None) -> Path:
    """Write a bank folder (float16 arrays, unit rows); built in a temporary folder and renamed into place, replacing
    only an earlier bank (see `check_bank_destination`)."""
    out_dir = check_bank_destination(out_dir)
    if len(targets) != len(texts) or (keys is not None and len(keys) != len(texts)):
        raise BankError(f"{len(texts)} texts, {len(targets)} targets, {None if keys is None else len(keys)} keys")
    staging = staging_dir(out_dir)
    try:
        with open(staging / "texts.txt", "w", encoding="utf-8") as handle:
            for text in texts:
                handle.write(" ".join(str(text).split()) + "\n")  # one line per text, whatever it held
        np.save(staging / "targets.npy", l2_normalize(targets).astype(np.float16))
        if keys is not None:
            np.save(staging / "keys.npy", l2_normalize(keys).astype(np.float16))
        (staging / BANK_MARKER).write_text(json.dumps({"rows": len(texts), **(meta or {})}, indent=1))
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # an empty folder made for the bank
        check_bank_destination(out_dir)  # still ours (or absent) after the work
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def top_k(queries: torch.Tensor, keys: np.ndarray, k: int, chunk_rows: int = DEFAULT_CHUNK_ROWS
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, row indices), each (B, k), of the k highest `queries @ keys.T` scores, read `chunk_rows` at a time."""
    k = min(k, len(keys))
    best_values = torch.full((len(queries), 0), float("-inf"), device=queries.device)
    best_rows = torch.zeros((len(queries), 0), dtype=torch.long, device=queries.device)
    for start in range(0, len(keys), chunk_rows):
        chunk = torch.from_numpy(np.asarray(keys[start:start + chunk_rows], dtype=np.float32)).to(queries.device)
        scores = queries.float() @ chunk.T
        values, rows = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_values = torch.cat([best_values, values], dim=1)
        merged_rows = torch.cat([best_rows, rows + start], dim=1)
        best_values, order = merged_values.topk(min(k, merged_values.shape[1]), dim=1)
        best_rows = merged_rows.gather(1, order)
        del chunk, scores  # one chunk in memory at a time
    return best_values, best_rows


def soft_average(values: torch.Tensor, rows: torch.Tensor, targets: np.ndarray, temperature: float) -> np.ndarray:
    """Unit (B, D): the softmax(values / temperature)-weighted mean of the targets' rows (only those rows are read)."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    weights = torch.softmax(values.double() / temperature, dim=1).cpu().numpy()
    flat = rows.cpu().numpy().reshape(-1)
    unique, inverse = np.unique(flat, return_inverse=True)
    gathered = np.asarray(targets[unique], dtype=np.float64)[inverse].reshape(*rows.shape, -1)
    return l2_normalize(np.einsum("bk,bkd->bd", weights, gathered))


def retrieve(queries: torch.Tensor, bank: Bank, k: int = DEFAULT_RETRIEVAL_K,
             temperature: float = DEFAULT_RETRIEVAL_TEMPERATURE,
             chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """Embed queries (unit rows in the keys' space) as the soft top-k average of the bank's targets."""
    if bank.keys is None:
        raise BankError(f"{bank.path}: this bank has no keys.npy to score queries against; it is a class bank "
                        "(use retrieve_from_logits)")
    queries = torch.nn.functional.normalize(queries.float(), dim=-1)
    values, rows = top_k(queries, bank.keys, k, chunk_rows)
    return soft_average(values, rows, bank.targets, temperature)


def retrieve_from_logits(logits: torch.Tensor, targets: np.ndarray, k: int = DEFAULT_RETRIEVAL_K,
                         temperature: float = DEFAULT_RETRIEVAL_TEMPERATURE) -> np.ndarray:
    """A classifier as a retriever: its class logits score a bank whose rows are its classes' phrases."""
    if logits.shape[1] != len(targets):
        raise BankError(f"{logits.shape[1]} logits for a bank of {len(targets)} class phrases")
    values, rows = logits.float().topk(min(k, logits.shape[1]), dim=1)
    return soft_average(values, rows, targets, temperature)


class ScoreWidthError(BankError):
    """A retrieval tower whose network gives another number of scores than its bank needs."""


class RetrievalHead(torch.nn.Module):
    """A retrieval tower's head: it holds the bank and turns the network's scores into the softmax-weighted mean of
    the top-k bank targets (unit rows). It has no parameters, so a tower checkpoint holds only the backbone."""

    def __init__(self, options: RetrievalOptions):
        super().__init__()
        self.options = options
        self.bank = Bank.open(options.bank)  # memory-mapped: nothing is read until a query scores it

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, rows) class logits or (B, key_dim) queries -> (B, D) float32 unit embeddings, scored in fp32."""
        expected = self.options.score_dim
        if scores.shape[-1] != expected:
            raise ScoreWidthError(f"the network outputs {tuple(scores.shape)}, expected (1, {expected}) (the bank's "
                                  "rows or key size)")
        if scores.is_meta:
            return torch.empty(len(scores), self.bank.targets.shape[1], device="meta")
        options = self.options
        with torch.autocast(scores.device.type, enabled=False):
            if options.score == "logits":
                out = retrieve_from_logits(scores.float(), self.bank.targets, options.k, options.temperature)
            else:
                out = retrieve(scores.float(), self.bank, options.k, options.temperature)
        return torch.from_numpy(out).to(scores.device)


def read_texts(path: str | Path, column: str | None = None) -> list[str]:
    """Texts from a .txt (one per line), .csv or .parquet file (`column`, default `prompt`); blank ones dropped."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
    else:
        import pandas as pd

        try:
            frame = (pd.read_parquet(path) if path.suffix.lower() == ".parquet"
                     else pd.read_csv(path, keep_default_na=False))
        except ImportError as err:
            raise BankError(f"{path}: reading parquet needs pyarrow (pip install pyarrow): {err}") from err
        column = column or "prompt"
        if column not in frame.columns:
            raise BankError(f"{path}: no column {column!r} (columns: {', '.join(map(str, frame.columns))}); "
                            "pass --column")
        lines = frame[column].astype(str).tolist()
    texts = [" ".join(t.split()) for t in lines]
    return [t for t in texts if t]


def clip_text_embeddings(texts: Sequence[str], arch: str, checkpoint: str | Path, batch_size: int = 256,
                         device: str = "cpu") -> np.ndarray:
    """Unit CLIP text embeddings from a local open_clip checkpoint (built with no pretrained tag, never the hub).

    `arch` is an open_clip model name or model-config .json; the checkpoint holds the whole CLIP state dict (as
    open_clip saves it). The matching image tower, used with `score: embedding`, then retrieves from these keys.
    """
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer
    from tqdm.auto import tqdm

    from .backbones import open_clip_config
    from .checkpoints import read_state_dict, strip_prefixes

    config = open_clip_config(arch)
    if config["text_cfg"].get("hf_tokenizer_name"):
        raise BankError(f"{arch}: its tokenizer comes from the Hugging Face hub, which is not used here")
    # A normal build: CLIP's attention mask is a buffer only its constructor computes (never in a checkpoint).
    model = open_clip.model.CLIP(**{k: v for k, v in config.items() if k in ("embed_dim", "vision_cfg", "text_cfg",
                                                                              "quick_gelu")})
    state = strip_prefixes(read_state_dict(Path(checkpoint)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BankError(f"{checkpoint} is not a full open_clip {arch} checkpoint: {err}") from err
    model = model.to(device).eval()
    tokenizer = SimpleTokenizer(context_length=config["text_cfg"].get("context_length", 77))
    chunks = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="CLIP text", unit="batch"):
            tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
            chunks.append(torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1).cpu().numpy())
    return np.concatenate(chunks)


def build_bank(texts_path: str | Path, out_dir: str | Path, column: str | None = None, keys: str = "none",
               text_model_path: str | Path | None = None, batch_size: int = 256, clip_arch: str | None = None,
               clip_checkpoint: str | Path | None = None) -> Path:
    """Embed a text file with all-MiniLM-L6-v2 into a bank. Keys: `none` (a classifier's class bank), `minilm` (query
    with 384-d vectors, snapping a prediction to real prompts) or `clip` (the texts through a local CLIP text tower,
    queried with the matching CLIP image tower)."""
    from .text import embed_prompts

    if keys not in ("none", "minilm", "clip"):
        raise BankError(f"keys {keys!r}: choose none, minilm or clip")
    if keys == "clip" and not (clip_arch and clip_checkpoint):
        raise BankError("--keys clip needs --clip-arch and --clip-checkpoint (a local open_clip checkpoint)")
    check_bank_destination(out_dir)  # before any text is embedded
    if not Path(texts_path).is_file():
        raise BankError(f"texts file not found: {texts_path}")
    texts = read_texts(texts_path, column)
    if not texts:
        raise BankError(f"{texts_path}: no texts")
    targets = embed_prompts(texts, model_path=text_model_path, batch_size=batch_size, progress=True)
    key_vectors = {"none": None, "minilm": targets}.get(keys)
    if keys == "clip":
        key_vectors = clip_text_embeddings(texts, clip_arch, clip_checkpoint, batch_size)
    return write_bank(out_dir, texts, targets, keys=key_vectors,
                      meta={"source": str(texts_path), "targets": "all-MiniLM-L6-v2", "keys": keys,
                            **({"clip_arch": clip_arch} if keys == "clip" else {})})
