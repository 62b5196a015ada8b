"""Retrieval (kNN regression) over a bank of texts: the prompt embedding as a soft average of the nearest texts'.

A bank is a folder: `texts.txt` (one text per line), `targets.npy` (N x 384 float16, the texts' all-MiniLM-L6-v2 unit
embeddings), optionally `keys.npy` (N x d float16, the score side, e.g. CLIP text embeddings), `bank.json` and
`index.faiss` (an IVF-PQ index of the keys). Arrays are memory-mapped: queries find their nearest keys in one streamed
pass for a whole run or through the index (`search.py`), and only the winners' target rows are read.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.ensemble import l2_normalize
from ..core.errors import I2PError
from ..core.fileio import open_npy, ours_to_write, replace_dir, staging_dir
from .search import DEFAULT_CHUNK_ROWS, nearest

DEFAULT_RETRIEVAL_K, DEFAULT_RETRIEVAL_TEMPERATURE = 10, 1.0  # the soft top-k when not given
WEIGHTINGS = ("softmax", "inverse")  # softmax(score / temperature), or 1 / ((1 - cos) ** power + eps)
DEFAULT_INVERSE_POWER, DEFAULT_INVERSE_EPS = 6.0, 1e-4  # the public kNN-regression notebook's


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
        """A bank folder's arrays memory-mapped, after checking their headers, sizes and shapes (and bank.json)."""
        path = Path(path)
        if not (path / "targets.npy").is_file():
            raise BankError(f"{path}: not a bank (no targets.npy); build one with `kaggle-i2p build-bank`")
        targets = open_npy(path / "targets.npy", "bank targets", ndim=2)
        keys = (open_npy(path / "keys.npy", "bank keys", ndim=2, rows=len(targets))
                if (path / "keys.npy").is_file() else None)
        return cls(path, targets, keys, read_bank_meta(path))


def read_bank_meta(path: Path) -> dict:
    """A bank's bank.json ({} when it has none); a damaged one is one BankError naming it."""
    meta_path = Path(path) / "bank.json"
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BankError(f"{meta_path} is damaged ({err}); rebuild the bank with `kaggle-i2p build-bank`") from err
    if not isinstance(meta, dict):
        raise BankError(f"{meta_path} is not a JSON object; rebuild the bank with `kaggle-i2p build-bank`")
    return meta


BANK_MARKER = "bank.json"


def check_bank_destination(out_dir: str | Path) -> Path:
    """A bank may be written to a new folder or over a bank we wrote (it holds bank.json); anything else is refused
    before any work, and nothing in it is touched."""
    out_dir = Path(out_dir)
    if not ours_to_write(out_dir, BANK_MARKER):
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
        publish_bank(staging, out_dir, {"rows": len(texts), **(meta or {})})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def publish_bank(staging: Path, out_dir: Path, meta: dict) -> None:
    """The last step of writing a bank: its bank.json, then the finished staging folder renamed to `out_dir`,
    replacing only an earlier bank or an empty folder."""
    (staging / BANK_MARKER).write_text(json.dumps(meta, indent=1))
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()  # an empty folder made for the bank
    check_bank_destination(out_dir)  # still ours (or absent) after the work
    replace_dir(staging, out_dir)


def neighbour_weights(values: np.ndarray, temperature: float = DEFAULT_RETRIEVAL_TEMPERATURE,
                      weighting: str = "softmax", power: float = DEFAULT_INVERSE_POWER,
                      eps: float = DEFAULT_INVERSE_EPS) -> np.ndarray:
    """(B, k) float64 weights summing to 1 per row, from the k scores: softmax(values / temperature), or (`inverse`,
    for cosines) 1 / ((1 - cos) ** power + eps) as the public kNN-regression notebook weighs its top rows."""
    values = np.asarray(values, dtype=np.float64)
    if weighting == "softmax":
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        scaled = values / temperature
        weights = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    elif weighting == "inverse":
        if power <= 0 or eps <= 0:
            raise ValueError("inverse weighting needs power > 0 and eps > 0")
        weights = 1.0 / (np.clip(1.0 - values, 0.0, None) ** power + eps)  # a cosine a hair above 1 is distance 0
    else:
        raise ValueError(f"weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    return weights / weights.sum(axis=1, keepdims=True)


def soft_average(values: np.ndarray | torch.Tensor, rows: np.ndarray | torch.Tensor, targets: np.ndarray,
                 temperature: float = DEFAULT_RETRIEVAL_TEMPERATURE, weighting: str = "softmax",
                 power: float = DEFAULT_INVERSE_POWER, eps: float = DEFAULT_INVERSE_EPS) -> np.ndarray:
    """Unit (B, D): the `neighbour_weights`-weighted mean of the targets' rows (only those rows are read)."""
    weights = neighbour_weights(torch.as_tensor(values).double().cpu().numpy(), temperature, weighting, power, eps)
    rows = np.maximum(torch.as_tensor(rows).cpu().numpy(), 0)  # a missing row (-1) has weight 0
    unique, inverse = np.unique(rows.reshape(-1), return_inverse=True)
    gathered = np.asarray(targets[unique], dtype=np.float64)[inverse].reshape(*rows.shape, -1)
    return l2_normalize(np.einsum("bk,bkd->bd", weights, gathered))


def retrieve(queries: np.ndarray | torch.Tensor, bank: Bank, k: int = DEFAULT_RETRIEVAL_K,
             temperature: float = DEFAULT_RETRIEVAL_TEMPERATURE, device: str | torch.device = "cpu",
             index: object | None = None, nprobe: int | None = None, candidates: int | None = None,
             chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: bool = False, weighting: str = "softmax",
             power: float = DEFAULT_INVERSE_POWER, eps: float = DEFAULT_INVERSE_EPS) -> np.ndarray:
    """Embed queries (rows in the keys' space) as the weighted top-k average of the bank's targets: one pass over
    the bank for all of them (or its FAISS `index`), the top k scored exactly (`search.nearest`), then weighted by
    their cosines (`neighbour_weights`)."""
    if bank.keys is None:
        raise BankError(f"{bank.path}: this bank has no keys.npy to score queries against; it is a class bank "
                        "(use retrieve_from_logits)")
    queries = l2_normalize(torch.as_tensor(queries).float().cpu().numpy())
    values, rows = nearest(queries, bank.keys, k, device, index=index, nprobe=nprobe, candidates=candidates,
                           chunk_rows=chunk_rows, progress=progress)
    return soft_average(values, rows, bank.targets, temperature, weighting, power, eps)


def retrieve_from_logits(logits: torch.Tensor, targets: np.ndarray, k: int = DEFAULT_RETRIEVAL_K,
                         temperature: float = DEFAULT_RETRIEVAL_TEMPERATURE) -> np.ndarray:
    """A classifier as a retriever: its class logits score a bank whose rows are its classes' phrases."""
    if logits.shape[1] != len(targets):
        raise BankError(f"{logits.shape[1]} logits for a bank of {len(targets)} class phrases")
    values, rows = logits.float().topk(min(k, logits.shape[1]), dim=1)
    return soft_average(values, rows, targets, temperature)
