"""File helpers: atomic file and folder writes (a reader, or a run killed mid-write, never sees half a file), file
hashes and identities, and the checks of files we did not write (.npy headers and sizes, text encodings) that run
before any compute."""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .errors import InputFileError, OutputError

TEMP_NAME_CHARS = 48  # the part of a name its temporary, staging and probe files carry: a 255-byte name stays writable


def _temp_prefix(name: str) -> str:
    return f".{name[:TEMP_NAME_CHARS]}."


def write_target(path: str | Path) -> tuple[Path, int]:
    """Where a write to `path` lands and the mode the new file gets: through a symlink to the file it names (the link
    is kept, not replaced by a file), keeping an existing file's permissions (a private 0600 file stays private);
    a new file gets what a plain open would give under the umask. An existing file that is read-only (no write
    bit, or not writable by this user) is an OutputError: a user's write-protected file is never replaced."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        info = target.stat()
    except (FileNotFoundError, NotADirectoryError):  # a new file (or one under a file: the caller says so)
        return target, _default_mode(directory=False)
    if stat.S_ISREG(info.st_mode) and (not stat.S_IMODE(info.st_mode) & 0o222 or not os.access(target, os.W_OK)):
        raise OutputError(f"{path} is read-only (mode {stat.S_IMODE(info.st_mode):o}); it is left as it is: make it "
                          "writable (chmod u+w) or choose another path")
    return target, stat.S_IMODE(info.st_mode)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Write to a hidden temporary file beside `path`, renamed over it only when the block completes (through a
    symlink to the file it names, an existing file's permissions kept: `write_target`)."""
    path, file_mode = write_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
        os.chmod(tmp, file_mode)
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
        try:
            for frame in frames:
                if not len(frame):
                    continue
                table = pa.Table.from_pandas(frame[list(columns)], preserve_index=False)
                writer = writer or pq.ParquetWriter(handle, table.schema)
                writer.write_table(table)
                rows += len(frame)
        finally:  # closed while its file is open, also when the stream fails (else it writes to a closed file)
            if writer is not None:
                writer.close()
        if writer is None:
            pd.DataFrame({c: pd.Series(dtype=str) for c in columns}).to_parquet(handle, index=False)
    return rows


def _default_mode(directory: bool) -> int:
    """The mode a plain mkdir/open would give under the current umask (mkdtemp/mkstemp give 0700/0600). Read from
    /proc where there is one: setting the umask to read it would briefly change it for every thread."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _owner_tag() -> str:
    """This process as a staging folder names it: host and pid, so a later process can tell a dead one's folder."""
    return f"{socket.gethostname()[:16].replace('.', '_')}-{os.getpid()}"


def sweep_stale_staging(target: Path) -> list[Path]:
    """Remove the staging and set-aside folders of `target` (`.NAME.HOST-PID.*.partial` / `.old`) left by a process
    of this host that is gone (killed mid-build); a live process's folder, or another host's, is never touched.
    Returns the folders removed."""
    prefix = _temp_prefix(target.name)
    host = _owner_tag().rsplit("-", 1)[0]
    removed = []
    for suffix in (".partial", ".old"):
        for entry in target.parent.glob(f"{glob.escape(prefix)}*{suffix}"):
            owner = entry.name[len(prefix):].split(".", 1)[0]
            owner_host, _, pid = owner.rpartition("-")
            if owner_host != host or not pid.isdigit() or _alive(int(pid)):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_dir(target: str | Path) -> Path:
    """A new, uniquely named hidden folder beside `target` with ordinary permissions, for building `target` whole:
    two processes building the same target never share one, and a killed process's folder is swept by the next."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(target.name)}{_owner_tag()}.", suffix=".partial",
                                    dir=target.parent))
    os.chmod(staging, _default_mode(directory=True))
    return staging


def replace_dir(staging: Path, target: Path) -> None:
    """Move a finished staging folder to `target`; an old `target` (the caller checked it is ours) is moved aside
    first and removed only after the new one is in place."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(target.name)}{_owner_tag()}.", suffix=".old",
                                    dir=target.parent))
        os.rename(target, old / target.name)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ours_to_write(folder: str | Path, marker: str) -> bool:
    """Whether a command may write into `folder`: it does not exist, is an empty folder, or holds the `marker` file
    that command leaves in every folder it writes (a file, or a folder of anyone else's, is not)."""
    folder = Path(folder)
    if not folder.exists():
        return True
    return folder.is_dir() and ((folder / marker).is_file() or not any(folder.iterdir()))


def name_too_long(path: str | Path, folder: str | Path = ".") -> str | None:
    """Why `path` cannot exist because one of its names is longer than the file system allows, or None."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in Path(path).parts:
        size = len(os.fsencode(part))
        if size > limit:
            return (f"file name too long: {part[:40]!r}... is {size} bytes, and a name in {folder} may have at most "
                    f"{limit}; choose a shorter name")
    return None


def check_writable_file(path: str | Path) -> Path:
    """Before the work that makes it: `path` must name a file (not a folder) whose nearest existing folder accepts a
    new file. Returns that folder; raises OutputError naming the path and the fix; creates nothing."""
    path = Path(path)
    if (too_long := name_too_long(path)) is not None:
        raise OutputError(f"cannot write {str(path)[:120]}: {too_long}")
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give the file's path, e.g. {path / 'submission.csv'}")
    path, _ = write_target(path)  # through a link; a read-only file refused
    existing = path.parent if str(path.parent) else Path(".")
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write {path}: {existing} is a file, not a folder; choose another path")
    probe_folder(existing, f"cannot write {path}: folder {existing}")
    return existing


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (through links and `..`), whether or not it exists yet."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(os.path.realpath(a)) == Path(os.path.realpath(b))


def check_distinct_outputs(outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None]) -> None:
    """Before any work: no two outputs of one command may be one file (the second write would replace the first),
    and no output may be one of the command's input files (`inputs`: a name -> a file, or a folder whose files are
    inputs). OutputError naming both."""
    named = [(k, Path(v)) for k, v in outputs.items() if v is not None]
    for i, (first, a) in enumerate(named):
        for second, b in named[i + 1:]:
            if same_file(a, b):
                raise OutputError(f"{first} and {second} both name {a}: the second write would replace the first; "
                                  "give each its own file")
        for what, source in inputs.items():
            if source is None:
                continue
            source = Path(source)
            if source.is_dir():
                inside = Path(os.path.realpath(a)).parent == Path(os.path.realpath(source))
                if inside and a.exists():
                    raise OutputError(f"{first} {a} is a file of {what} {source}: writing it would replace an "
                                      "input; choose another path")
            elif same_file(a, source):
                raise OutputError(f"{first} {a} is the {what}: writing it would replace it; choose another path")


def probe_folder(folder: str | Path, what: str, room: int = 0) -> None:
    """Prove `folder` accepts a new file and has `room` bytes free: a probe file is written (up to 1 MiB of it) and
    removed. Raises OutputError starting with `what`, naming the cause and the fix."""
    folder = Path(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".kaggle_i2p.", suffix=".probe", dir=folder)
        try:
            os.write(fd, b"\0" * min(room, 1 << 20))
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OutputError(f"{what} is full (no space left on the device); free some space or choose another "
                              "folder") from err
        raise OutputError(f"{what} is not writable ({err.strerror or err}); choose a writable folder") from err
    free = shutil.disk_usage(folder).free
    if free < room:
        raise OutputError(f"{what} has {free / 1e6:.1f} MB free and needs up to {room / 1e6:.1f} MB; free some "
                          "space or choose another folder")


# Files we did not write: checked before any compute --------------------------------------------------------------

def npy_header(path: str | Path, what: str) -> tuple[tuple[int, ...], object]:
    """(shape, dtype) of a .npy file from its header, after checking that the file holds every byte the header
    promises and no Python objects; raises InputFileError naming `what` and the file."""
    import numpy as np

    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block the read forever, a device never end
        raise InputFileError(f"{what} {path}: not a regular file (a folder, FIFO or device); give the .npy file")
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(handle)
            offset = handle.tell()
            size = os.fstat(handle.fileno()).st_size
    except (ValueError, EOFError, SyntaxError) as err:
        raise InputFileError(f"{what} {path}: not a readable .npy file ({err}); write it with numpy.save") from err
    if dtype.hasobject:
        raise InputFileError(f"{what} {path}: holds Python objects (a pickle), which are never loaded; save a numeric "
                             "array")
    needed = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < needed:
        raise InputFileError(f"{what} {path}: truncated or damaged: {size} bytes, and its header ({shape}, {dtype}) "
                             f"needs {needed}; copy or build it again")
    return tuple(shape), dtype


def open_npy(path: str | Path, what: str, *, ndim: int | None = None, width: int | None = None,
             rows: int | None = None, numeric: bool = True, mmap: bool = True):
    """A .npy array, memory-mapped (or read), after `npy_header`'s checks and the expected rank, width (last axis)
    and rows; every mismatch is one InputFileError naming the file, its shape and the expected one."""
    import numpy as np

    shape, dtype = npy_header(path, what)
    if numeric and dtype.kind not in "fiu":
        raise InputFileError(f"{what} {path}: holds {dtype} values; expected numbers (float)")
    if (ndim is not None and len(shape) != ndim) or (width is not None and (not shape or shape[-1] != width)) or (
            rows is not None and (not shape or shape[0] != rows)):
        want = f"; expected ({'rows' if rows is None else rows}, {'D' if width is None else width})" if ndim == 2 \
            else ""
        raise InputFileError(f"{what} {path}: has shape {shape}{want}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputFileError(f"{what} {path}: cannot be read ({err})") from err


def decode_problem(err: UnicodeDecodeError, offset: int = 0, lines: int = 0) -> str:
    """`is not ENCODING text: byte 0x.. at offset N, line L`, for a message that names the file and the fix;
    `offset` and `lines`: the bytes and newlines before `err.object`."""
    data = err.object
    line = lines + data.count(b"\n", 0, err.start) + 1
    return f"is not {err.encoding} text: byte {data[err.start]:#04x} at offset {offset + err.start}, line {line}"


def first_undecodable(path: str | Path, encoding: str = "utf-8", chunk_bytes: int = 1 << 20) -> str | None:
    """Where a text file first fails to decode (`decode_problem`'s words), read in chunks; None when all of it
    decodes."""
    import codecs

    decoder = codecs.getincrementaldecoder(encoding)()
    offset = lines = 0  # bytes and newlines before the current chunk
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            buffered = decoder.getstate()[0]  # an incomplete character held from the last chunk (no newline)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                return decode_problem(err, offset - len(buffered), lines)
            if not chunk:
                return None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints are GB-sized)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: str | Path) -> str:
    """Resolved path, size, modification and status-change times and inode: any rewrite of the file changes it (the
    ctime cannot be set back, unlike the mtime; a file replaced by a rename has another inode), so a memoised hash is
    never served for other content."""
    info = Path(path).stat()
    return f"{Path(path).resolve()}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}:{info.st_ino}"
