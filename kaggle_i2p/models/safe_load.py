"""Reading torch files we did not write without ever running their code, and without letting a small file take the
machine.

- `archive_problem`: a zip archive (torch.save, torch.jit.save and torch.export.save all write one) is checked from its
  directory before anything inflates: a member compressed past `MAX_RATIO` (a "zip bomb": 3 MB on disk, 3 GB
  inflated), or declared larger than the file system could hold, is refused. torch's own writers never compress.
- `load_pickled`: a torch.save file read by torch's `weights_only` unpickler, with plain metadata allowed
  (`PLAIN_GLOBALS`: argparse's Namespace that Lightning and timm's train.py keep beside the weights, paths, dates,
  numpy scalars and arrays). An object of any other class is kept as an inert `PickledObject` (its class name and
  state; its class is never imported and no function is ever called), so the tensors beside it are still read; a
  whole pickled module (`torch.save(model)`) is refused with the way to save a state dict. Modules torch blocks
  (os, sys, subprocess, ...) are refused outright.
- `guarded_unpickling`: the context a torch.export program loads in. torch's loader falls back to
  `weights_only=False` when a record does not load safely, and reads some constants with `pickle.loads`; inside the
  context every torch.load is `weights_only=True` and every Python unpickling of the archive refused, so such a file
  is one message, never a payload run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import pathlib
import threading
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..core.errors import I2PError

MAX_RATIO = 50  # a compressed member inflating past this many times its stored size (beyond MIN_BOMB) is a bomb
MIN_BOMB = 16 << 20  # members inflating to less than this are never refused for their ratio


class UnsafeFileError(I2PError, ValueError):
    """A file that would run code or take the machine if it were read: refused before it is."""


class UnreadableFileError(I2PError, ValueError):
    """A file that is not in the format its name says (random bytes, an empty file)."""


def archive_problem(source: str | Path | BinaryIO) -> str | None:
    """Why a zip archive must not be inflated (a member compressed past MAX_RATIO, or declared past what its file
    could hold), from its directory alone; None when it is safe to read or is not a zip archive at all."""
    try:
        with zipfile.ZipFile(source) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    for info in members:
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                return (f"its member {info.filename} declares {info.file_size} bytes but stores {info.compress_size} "
                        "(a damaged or crafted archive)")
            continue
        if info.file_size > MIN_BOMB and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            return (f"its member {info.filename} inflates from {info.compress_size:,} to {info.file_size:,} bytes "
                    f"(over {MAX_RATIO}x: a zip bomb); torch's own writers never compress, so save it again with "
                    "torch.save / torch.jit.save / torch.export.save")
    return None


def check_archive(path: str | Path, what: str = "") -> None:
    """`archive_problem` as an UnsafeFileError naming the file."""
    problem = archive_problem(path)
    if problem:
        raise UnsafeFileError(f"{what or Path(path).name}: refused, {problem}")


# ---- torch.save files: tensors and plain metadata, never code -------------------------------------------------------

class PickledObject:
    """An object of a class outside the allow-list, as the pickle described it: the class's dotted name, the arguments
    and the state, with none of its code run (its class is never imported)."""

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        obj = object.__new__(cls)
        obj.__dict__.update(_args=args, _state=None)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<{self.qualified_name}, not unpickled>"


def _plain_globals() -> dict[str, Any]:
    """Classes of plain data a training checkpoint keeps beside its tensors, safe to build (no code of the file's)."""
    import numpy as np

    plain: dict[str, Any] = {"argparse.Namespace": argparse.Namespace, "datetime.datetime": datetime.datetime,
                             "datetime.date": datetime.date, "datetime.time": datetime.time,
                             "datetime.timedelta": datetime.timedelta, "datetime.timezone": datetime.timezone,
                             "collections.defaultdict": __import__("collections").defaultdict}
    for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
        plain[f"pathlib.{name}"] = plain[f"pathlib._local.{name}"] = getattr(pathlib, name)
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core; pickles name either
    for core in ("numpy.core", "numpy._core"):
        plain[f"{core}.multiarray.scalar"] = multiarray.multiarray.scalar
        plain[f"{core}.multiarray._reconstruct"] = multiarray.multiarray._reconstruct
    plain["numpy.dtype"], plain["numpy.ndarray"] = np.dtype, np.ndarray
    for dtype in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType",
                  "UInt8DType", "StrDType", "BytesDType"):
        if hasattr(np.dtypes, dtype):
            plain[f"numpy.dtypes.{dtype}"] = getattr(np.dtypes, dtype)
    return plain


def _inert(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (PickledObject,), {"qualified_name": name, "__module__": __name__})


_LOAD_LOCK = threading.Lock()  # torch's allow-list is process-wide: one allow-listed load at a time


def load_pickled(path: Path, device: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """A torch.save file's object, read without running code: `weights_only`, plain metadata allowed, any other
    class kept inert (`PickledObject`). UnsafeFileError for a bomb, a blocked module (os, sys, ...) or a file
    whose object is itself such a class (a pickled module)."""
    check_archive(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            head = handle.read(2)
        if len(head) < 2 or head[0] != 0x80:  # neither torch's zip format nor its legacy pickle format
            what = "empty" if not head else "its bytes are neither a zip archive nor a pickle"
            raise UnreadableFileError(f"{path.name}: not a torch.save file ({what}); copy it again, or save it with "
                                      "torch.save / safetensors")
    try:
        return _torch_load(path, device, mmap)
    except Exception as err:  # noqa: BLE001 - refused by weights_only: read again with the allow-list below
        if not isinstance(err, __import__("pickle").UnpicklingError):
            raise
        first = err
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - the legacy (non-zip) format cannot be listed: weights_only's refusal stands
        raise UnsafeFileError(_refusal(path, first)) from first
    blocked = [n for n in names if n.split(".", 1)[0] in _blocked_modules()]
    if blocked:
        raise UnsafeFileError(f"{path.name}: refused, its pickle calls {', '.join(sorted(blocked))}, which would run "
                              "code; it is never unpickled here (save the weights with safetensors or "
                              "torch.save(model.state_dict()))")
    plain = _plain_globals()
    allowed = [(plain[n], n) if n in plain else (_inert(n), n) for n in names]
    with _LOAD_LOCK, torch.serialization.safe_globals(allowed):
        try:
            obj = _torch_load(path, device, mmap)
        except Exception as err:  # noqa: BLE001 - still not readable as data: one message
            raise UnsafeFileError(_refusal(path, err)) from err
    if isinstance(obj, PickledObject):
        raise UnsafeFileError(f"{path.name}: holds a whole pickled {obj.qualified_name} object (torch.save(model)), "
                              "whose code is never run here; save its weights instead (torch.save(model."
                              "state_dict(), 'tower.pt') or safetensors' save_file), or convert this file once: "
                              f"kaggle-i2p convert {path.name} --trust-pickle [--code TRAINING_CODE.py]")
    return obj


def _torch_load(path: Path, device: str | torch.device, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except RuntimeError:
        if not mmap:
            raise
        return torch.load(path, map_location=device, weights_only=True)  # the legacy format cannot be mapped


def _blocked_modules() -> set[str]:
    from torch import _weights_only_unpickler as wo

    return set(getattr(wo, "_blocklisted_modules", ())) | {"os", "posix", "nt", "sys", "subprocess", "builtins",
                                                            "shutil", "socket", "importlib", "runpy", "pickle"}


def _reason(err: BaseException) -> str:
    """The line of torch's weights_only refusal that names what was refused (its advice to allow-list left out)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line or "blocked" in line),
                lines[0] if lines else type(err).__name__)


def _refusal(path: Path, err: BaseException) -> str:
    return (f"{path.name}: cannot be read as tensors and plain data without running code ({_reason(err)}); save "
            "the weights with torch.save(model.state_dict()) or safetensors")


def metadata_objects(obj: Any, limit: int = 8) -> list[str]:
    """The dotted class names of the inert objects a loaded file holds (for a description: what was not unpickled)."""
    found: dict[str, None] = {}

    def walk(value: Any, depth: int) -> None:
        if len(found) >= limit or depth > 6:
            return
        if isinstance(value, PickledObject):
            found.setdefault(value.qualified_name)
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item, depth + 1)
        elif isinstance(value, (list, tuple)):
            for item in value[:64]:
                walk(item, depth + 1)

    walk(obj, 0)
    return list(found)


# ---- programs: torch.export's loader without its pickle fallbacks ---------------------------------------------------

class _RefusedPickle:
    """Stands for the `pickle` module inside torch's program loader: every unpickling there is refused."""

    UnpicklingError = __import__("pickle").UnpicklingError

    @staticmethod
    def loads(*args: Any, **kwargs: Any) -> Any:
        raise UnsafeFileError("the program holds Python objects pickled with pickle (opaque constants), which are "
                              "never unpickled here; export a model whose constants are tensors")

    load = loads


_GUARD_LOCK = threading.RLock()


@contextlib.contextmanager
def guarded_unpickling() -> Iterator[None]:
    """Within: every torch.load reads `weights_only=True` whatever its caller asked (a record that needs more is an
    UnsafeFileError), a nested archive is checked for bombs first, and torch.export's loader can unpickle no Python
    object (its `pickle.loads` and TorchScript object constants refused)."""
    import torch.export.pt2_archive._package as package

    original_load, original_pickle = torch.load, getattr(package, "pickle", None)
    original_obj = getattr(torch._C, "_pickle_load_obj", None)

    def safe_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        if isinstance(f, (bytes, bytearray, io.IOBase)):
            buffer = f if isinstance(f, io.IOBase) else io.BytesIO(f)
            problem = archive_problem(buffer)
            buffer.seek(0)
            if problem:
                raise UnsafeFileError(f"a record of the program: {problem}")
            f = buffer
        try:
            return original_load(f, *args, **kwargs)
        except Exception as err:
            if isinstance(err, __import__("pickle").UnpicklingError):
                raise UnsafeFileError(f"a record of the program is a pickle that only loads by running code "
                                      f"({_reason(err)}); it is never unpickled here: export the program again "
                                      "from plain tensors with torch.export.save") from err
            raise

    def refused_obj(*args: Any, **kwargs: Any) -> Any:
        raise UnsafeFileError("the program holds TorchScript object constants (custom classes), which are never "
                              "unpickled here")

    with _GUARD_LOCK:
        torch.load = safe_load
        if original_pickle is not None:
            package.pickle = _RefusedPickle
        if original_obj is not None:
            torch._C._pickle_load_obj = refused_obj
        try:
            yield
        finally:
            torch.load = original_load
            if original_pickle is not None:
                package.pickle = original_pickle
            if original_obj is not None:
                torch._C._pickle_load_obj = original_obj
