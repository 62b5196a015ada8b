"""A prediction cache that makes long runs resumable: every tower x view output is stored as it is made.

Layout: `<root>/<tower key>/<view>/<chunk key>.npz`, one shard per fixed chunk of the sorted image listing, written
atomically. The tower key hashes everything that decides the tower's output (checkpoint sha256, arch, head,
preprocessing, precision), so changing a tower invalidates only that tower; the chunk key hashes the chunk's image
identities (id, size, mtime), so changed or added images invalidate only their chunks. Shards hold the raw float32
forward outputs, so cached and fresh runs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .atomic import atomic_open
from .manifest import TowerSpec
from .towers import sha256_file

FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 256


def _retrieval_identity(spec: TowerSpec) -> dict | None:
    """A retrieval tower's options and its bank's identity (the bank's files by size and modification time)."""
    if spec.retrieval is None:
        return None
    options = asdict(spec.retrieval)
    options["bank"] = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(spec.retrieval.bank.iterdir())
                       if p.is_file()}
    return options


def image_key(path: Path) -> str:
    """An image's identity for the cache: id, size and modification time (changing the file changes the key)."""
    stat = path.stat()
    return f"{path.stem}:{stat.st_size}:{stat.st_mtime_ns}"


def _digest(payload: object, length: int = 24) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]


class PredictionCache:
    """Shards of raw per-view tower outputs under `root`, keyed by tower identity, view and image chunk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._hashes_path = self.root / "checkpoint_sha256.json"

    def checkpoint_sha256(self, spec: TowerSpec) -> str:
        """The manifest's sha256 when given, else the file's, memoised by path, size and mtime."""
        if spec.sha256:
            return spec.sha256.lower()
        stat = spec.checkpoint.stat()
        memo_key = f"{spec.checkpoint.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        memo = json.loads(self._hashes_path.read_text()) if self._hashes_path.is_file() else {}
        if memo_key not in memo:
            memo[memo_key] = sha256_file(spec.checkpoint)
            with atomic_open(self._hashes_path) as handle:
                json.dump(memo, handle, indent=1, sort_keys=True)
        return memo[memo_key]

    def tower_key(self, spec: TowerSpec, precision: str, embedding_dim: int) -> str:
        """Hash of everything that decides a tower's outputs (not its name, weight or resolutions list)."""
        arch = spec.arch
        if arch.endswith(".json"):
            arch = json.loads(Path(arch).read_text(encoding="utf-8"))
        image = asdict(spec.image)
        for per_run_only in ("resolutions", "hflip", "view_weights"):  # views are keyed one by one
            image.pop(per_run_only, None)
        identity = {"format": FORMAT_VERSION, "kind": spec.kind, "library": spec.library, "arch": arch,
                    "head": asdict(spec.head), "checkpoint_sha256": self.checkpoint_sha256(spec),
                    "native_resolution": spec.native_resolution, "image": image, "precision": precision,
                    "embedding_dim": embedding_dim, "retrieval": _retrieval_identity(spec)}
        return f"{spec.name}-{_digest(identity)}"

    def shard_path(self, tower_key: str, view: str, image_keys: list[str]) -> Path:
        return self.root / tower_key / view / f"{_digest(image_keys, 32)}.npz"

    def load(self, tower_key: str, view: str, image_keys: list[str]) -> tuple[np.ndarray, list[str]] | None:
        """(raw outputs (n, D) float32 with NaN rows for unreadable images, per-row decode errors) or None."""
        path = self.shard_path(tower_key, view, image_keys)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as shard:
                if shard["keys"].tolist() != image_keys:
                    return None
                return shard["outputs"].astype(np.float32, copy=False), shard["errors"].tolist()
        except (OSError, ValueError, KeyError):  # a damaged shard is recomputed, never trusted
            return None

    def save(self, tower_key: str, view: str, image_keys: list[str], outputs: np.ndarray, errors: list[str]) -> None:
        with atomic_open(self.shard_path(tower_key, view, image_keys), "wb") as handle:
            np.savez(handle, keys=np.array(image_keys), outputs=np.asarray(outputs, dtype=np.float32),
                     errors=np.array(errors, dtype=str))
