"""A prediction cache that makes long runs resumable: every tower x view output is stored as it is made.

Layout: `<root>/<tower key>/<view>/<chunk key>.npz`, one shard per fixed chunk of the sorted image listing, written
atomically after every batch, so a kill loses at most the batch in flight. A shard holds the chunk's raw float32
outputs, a `done` mask per row and the per-row decode errors; a resumed run computes only the rows not done, with
the same batch boundaries, so cached and fresh runs give the same bytes.

The tower key hashes everything that decides the tower's outputs: the weights' sha256 (the checkpoint file's own, or
for a file saved in another layout that of its tensors under the tower's keys, so however the same weights were wrapped
they share one cache; memoised by path, size, modification and status-change time, never taken from the manifest on
trust), arch, head, preprocessing,
precision and batch size. The chunk key hashes the chunk's image identities: id, size and modification time, or
with `verify_images` the content's sha256 (an image rewritten with the same size and modification time is only
caught that way).

The cache is an optional helper: a shard that cannot be read is recomputed with a warning naming it, and a cache that
cannot be written (full disk, read-only folder) is switched off with one warning while the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from ..core.fileio import atomic_open, file_identity, sha256_file
from ..manifest import NetworkSpec, identity_dict, kind_of
from ..manifest.fields import path_keys
from ..models.backbones import library
from ..models.checkpoints import checkpoint_sha256, content_identity, source_identity, source_sha256
from ..models.towers import tower_weights_sha256

log = logging.getLogger("kaggle_i2p")

FORMAT_VERSION = 4  # 3: the tower's identity is its manifest entry; 4: a bank-searching tower stores its queries
DEFAULT_CHUNK_SIZE = 256
HASH_MEMO = "checkpoint_sha256.json"


def image_key(path: Path, verify: bool = False) -> str:
    """An image's identity for the cache: id, size and modification time, or id and content sha256 (`verify`)."""
    if verify:
        return f"{path.stem}:sha256:{sha256_file(path)}"
    stat = path.stat()
    return f"{path.stem}:{stat.st_size}:{stat.st_mtime_ns}"


def _digest(payload: object, length: int = 24) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]


class Shard:
    """One chunk's record of one tower x view: (n, D) float32 outputs, rows done, per-row decode errors, for a tower
    that makes texts (a caption tower) its text per row, and the rows it gave a value for (all, unless a row has none
    by design: a caption tower's image without a caption; a shard stored before this was kept reads all)."""

    def __init__(self, outputs: np.ndarray, done: np.ndarray, errors: list[str], texts: list[str] | None = None,
                 present: np.ndarray | None = None):
        self.outputs, self.done, self.errors, self.texts = outputs, done, errors, texts
        self.present = np.ones(len(done), dtype=bool) if present is None else present


def by_content(cls: type, entry: dict) -> dict:
    """A tower's identity with every path field its class marks (sections too) that is still a path after the kind's
    own `cache_identity` replaced by the file's or folder's content (`content_identity`): a plugin kind's file
    rewritten in place is a new key, the same file moved is not. A kind that keys a path its own way (a bank by its
    files, a searched bank not at all) has already replaced or dropped it."""
    out = dict(entry)
    for key, path, section in path_keys(cls):
        value = out.get(key)
        if section is not None and isinstance(value, dict):
            out[key] = by_content(section, value)
        elif path is True and isinstance(value, str):
            out[key] = content_identity(value)
        elif path is True and isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[key] = [content_identity(v) for v in value]
    return out


class PredictionCache:
    """Shards of raw per-view tower outputs under `root`, keyed by tower identity, view and image chunk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.writable = True
        self.root.mkdir(parents=True, exist_ok=True)
        self._hashes_path = self.root / HASH_MEMO

    @classmethod
    def open(cls, root: str | Path | None) -> PredictionCache | None:
        """The cache at `root`, or None (with a warning) when it cannot be made: the run goes on without it."""
        if root is None:
            return None
        try:
            return cls(root)
        except OSError as err:
            log.warning("cache %s cannot be used (%s); running without a cache", root, err.strerror or err)
            return None

    def _read_memo(self) -> dict:
        if not self._hashes_path.is_file():
            return {}
        try:
            memo = json.loads(self._hashes_path.read_text(encoding="utf-8"))
            if isinstance(memo, dict) and all(isinstance(v, str) for v in memo.values()):
                return memo
            raise ValueError("not a mapping of hashes")
        except (OSError, ValueError, UnicodeDecodeError) as err:
            log.warning("cache: %s is damaged (%s); hashing the checkpoints again", self._hashes_path, err)
            return {}

    def file_sha256(self, path: Path) -> str:
        """One file's sha256, memoised in the cache by path, size, modification and status-change time and inode."""
        memo_key = file_identity(path)
        memo = self._read_memo()
        if memo_key not in memo:
            memo[memo_key] = checkpoint_sha256(path)
            self._write(self._hashes_path, "w", lambda handle: json.dump(memo, handle, indent=1, sort_keys=True))
        else:
            checkpoint_sha256.remember(path, memo[memo_key])
        return memo[memo_key]

    def checkpoint_sha256(self, spec: NetworkSpec) -> str:
        """The checkpoint's sha256 (`checkpoints.source_sha256`: one file's own, or its files' together), each file's
        memoised in the cache."""
        return source_sha256(spec.checkpoint, self.file_sha256)

    def weights_sha256(self, spec: NetworkSpec, embedding_dim: int) -> str:
        """The tower's weights' sha256 (`towers.tower_weights_sha256`: the file's own, or the same for any wrapping of
        the same weights), memoised in the cache by the file's identity and the entry that reads it. A program tower
        without a checkpoint has none of its own: its program's content is the `arch` identity."""
        if spec.checkpoint is None:
            return tower_weights_sha256(spec, embedding_dim, lambda path: "")
        memo_key = f"{source_identity(spec.checkpoint)} as {_digest(spec.to_dict())}"
        memo = self._read_memo()
        if memo_key not in memo:
            digest = tower_weights_sha256(spec, embedding_dim, lambda path: self.checkpoint_sha256(spec))
            memo = {**self._read_memo(), memo_key: digest}
            self._write(self._hashes_path, "w", lambda handle: json.dump(memo, handle, indent=1, sort_keys=True))
        return memo[memo_key]

    def tower_key(self, spec: NetworkSpec, precision: str, embedding_dim: int, batch_size: int,
                  compiled: bool = False) -> str:
        """Hash of everything that decides a tower's outputs: its manifest entry without the fields marked as not
        changing them (name, weight, file paths, the views, keyed one by one), plus the checkpoint's contents and
        what the kind adds (`TowerKind.cache_identity`: a classifier-retriever's bank files).

        The batch size is part of it: a batch's values can differ in the last bits with its size, and a resumed run
        must give the bytes of an uninterrupted one. So is compiling (its kernels round differently from eager).
        """
        entry = identity_dict(type(spec), spec.to_dict())  # the fields marked as not changing outputs left out
        entry["kind"] = spec.kind
        entry["arch"] = library(spec.library).arch_identity(spec.arch)  # a config file by its content
        entry = by_content(type(spec), kind_of(spec).cache_identity(spec, entry))
        weights = self.weights_sha256(spec, embedding_dim)
        identity = {"format": FORMAT_VERSION, "tower": entry, "checkpoint_sha256": weights,
                    "precision": precision, "embedding_dim": embedding_dim, "batch_size": batch_size,
                    **({"compiled": True} if compiled else {})}  # absent when eager: older caches stay valid
        return f"{spec.name}-{_digest(identity)}"

    def shard_path(self, tower_key: str, view: str, image_keys: list[str]) -> Path:
        return self.root / tower_key / view / f"{_digest(image_keys, 32)}.npz"

    def load(self, tower_key: str, view: str, image_keys: list[str]) -> Shard | None:
        """The stored shard of these images (complete or partial), or None; an unreadable shard is None + a warning."""
        path = self.shard_path(tower_key, view, image_keys)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if data["keys"].tolist() != image_keys:
                    return None
                outputs = data["outputs"].astype(np.float32, copy=False)
                done, errors = data["done"].astype(bool), data["errors"].tolist()
                texts = data["texts"].tolist() if "texts" in data.files else None
                present = data["present"].astype(bool) if "present" in data.files else None
            if outputs.shape[0] != len(image_keys) or done.shape != (len(image_keys),) or len(errors) != len(done) \
                    or (texts is not None and len(texts) != len(done)) \
                    or (present is not None and present.shape != done.shape):
                raise ValueError("its arrays disagree in length")
            if present is None and texts is not None:  # stored before the rows present were: a caption's row had one
                present = np.array([bool(text) for text in texts])
            return Shard(outputs, done, errors, texts, present)
        except Exception as err:  # noqa: BLE001 - a damaged shard (truncated, flipped, emptied) is recomputed
            log.warning("cache: %s is unreadable (%s: %s); recomputing it", path, type(err).__name__, err)
            return None

    def save(self, tower_key: str, view: str, image_keys: list[str], shard: Shard) -> None:
        """Store a chunk's shard atomically; a write failure switches the cache off with one warning."""
        extra = {} if shard.texts is None else {"texts": np.array(shard.texts, dtype=str)}
        if not shard.present.all():
            extra["present"] = np.asarray(shard.present, dtype=bool)  # stored only where a row has no value
        self._write(self.shard_path(tower_key, view, image_keys), "wb", lambda handle: np.savez(
            handle, keys=np.array(image_keys), outputs=np.asarray(shard.outputs, dtype=np.float32),
            done=np.asarray(shard.done, dtype=bool), errors=np.array(shard.errors, dtype=str), **extra))

    def _write(self, path: Path, mode: str, write) -> None:
        if not self.writable:
            return
        try:
            with atomic_open(path, mode) as handle:
                write(handle)
        except OSError as err:
            self.writable = False
            log.warning("cache: cannot write %s (%s); the run goes on without storing more outputs", path,
                        err.strerror or err)
