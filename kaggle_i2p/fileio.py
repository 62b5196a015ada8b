"""File helpers: atomic file and folder writes (a reader, or a run killed mid-write, never sees half a file), and
file hashes and identities."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .errors import OutputError


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Write to a hidden temporary file beside `path`, renamed over it only when the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet(frame, path: str | Path) -> None:
    """A pandas DataFrame as a parquet file, written atomically (needs pyarrow)."""
    with atomic_open(path, "wb") as handle:
        frame.to_parquet(handle, index=False)


def write_parquet_batches(frames: Iterable, path: str | Path, columns: Sequence[str]) -> int:
    """DataFrames with the same columns streamed into one parquet file, written atomically (an error while they
    stream leaves no file); returns the rows written."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    with atomic_open(path, "wb") as handle:
        writer = None
        for frame in frames:
            table = pa.Table.from_pandas(frame[list(columns)], preserve_index=False)
            writer = writer or pq.ParquetWriter(handle, table.schema)
            writer.write_table(table)
            rows += len(frame)
        if writer is None:
            pd.DataFrame({c: pd.Series(dtype=str) for c in columns}).to_parquet(handle, index=False)
        else:
            writer.close()
    return rows


def _default_mode(directory: bool) -> int:
    """The mode a plain mkdir/open would give under the current umask (mkdtemp/mkstemp give 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def staging_dir(target: str | Path) -> Path:
    """A new, uniquely named hidden folder beside `target` with ordinary permissions, for building `target` whole:
    two processes building the same target never share one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    os.chmod(staging, _default_mode(directory=True))
    return staging


def replace_dir(staging: Path, target: Path) -> None:
    """Move a finished staging folder to `target`; an old `target` (the caller checked it is ours) is moved aside
    first and removed only after the new one is in place."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.rename(target, old / target.name)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable_file(path: str | Path) -> Path:
    """Before the work that makes it: `path` must name a file (not a folder) whose nearest existing folder accepts a
    new file. Returns that folder; raises OutputError naming the path and the fix; creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give the file's path, e.g. {path / 'submission.csv'}")
    existing = path.parent if str(path.parent) else Path(".")
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write {path}: {existing} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"cannot write {path}: folder {existing} is not writable ({err.strerror or err}); "
                          "choose a writable folder for the output") from err
    return existing


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints are GB-sized)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: str | Path) -> str:
    """Resolved path, size, modification and status-change times: any rewrite of the file changes it (the ctime
    cannot be set back, unlike the mtime), so a memoised hash is never served for other content."""
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
