"""`kaggle-i2p convert FILE --trust-pickle`: a whole pickled model (`torch.save(model)`, common in notebooks) as a
safetensors file of its weights, plus the tower entry `inspect` proposes for it.

A pickle runs whatever code it names when it is loaded, so nothing here ever loads one during a run, a check or an
inspect: conversion is its own command, taken only with the user's explicit `--trust-pickle`, and the pickle is
loaded in a child process of its own (`python -m kaggle_i2p.models.convert`), which hands back only a safetensors
file. A model whose class was defined in a notebook or script (`__main__.Net`) needs that definition: `--code
FILE.py` runs the file's definitions (its `if __name__ == "__main__":` block does not run) where the pickle looks for
them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..core.errors import I2PError
from ..core.fileio import atomic_open, check_writable_file

CHILD_NAMESPACE = "__i2p_convert__"  # the `__name__` a --code file runs under: its main block stays off


class ConvertError(I2PError, RuntimeError):
    """A pickle that cannot be converted: no consent, a class whose definition is missing, no weights in it."""


def convert_pickle(path: str | Path, out: str | Path | None = None, *, trust_pickle: bool = False,
                   code: Sequence[str | Path] = (), timeout: float = 3600) -> Path:
    """The weights of the pickled model at `path`, written as safetensors to `out` (default: beside it, `.safetensors`
    for its suffix; an existing file is never replaced) by a child process that unpickles it; only with
    `trust_pickle`."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if not trust_pickle:
        raise ConvertError(f"converting {path.name} unpickles it, which runs whatever code it names: pass "
                           "--trust-pickle if you made the file or trust where it came from (it runs in a process "
                           "of its own, never during a run)")
    from .safe_load import UnsafeFileError, check_archive

    try:
        check_archive(path)  # consent to run the pickle's code is not consent to inflate a bomb
    except UnsafeFileError as err:
        raise ConvertError(str(err)) from err
    out = Path(out) if out is not None else path.with_name(path.name.split(".")[0] + ".safetensors")
    if out.exists():
        raise ConvertError(f"{out} exists and is left as it is: pass --out with a new file's path")
    check_writable_file(out)
    for file in code:
        if not Path(file).is_file():
            raise ConvertError(f"--code {file}: no such file")
    command = [sys.executable, "-m", "kaggle_i2p.models.convert", str(path.resolve()), str(out.resolve()),
               *(str(Path(f).resolve()) for f in code)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    if done.returncode != 0:
        said = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        reason = said[-1] if said else f"exit {done.returncode}"
        hint = ("; its class is defined in the training code: pass that file with --code (its definitions run, "
                "its main block does not)" if "AttributeError" in reason or "ModuleNotFoundError" in reason else "")
        raise ConvertError(f"{path.name} could not be converted: {reason}{hint}")
    return out


def _state_of(obj: object) -> dict:
    """The tensors of an unpickled object: a module's state dict, a state dict, or the state of the one module or
    state dict a wrapper holds (`{'model': Net(...)}`)."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        inner = [v for v in obj.values() if isinstance(v, (torch.nn.Module, Mapping))]
        modules = [v for v in inner if isinstance(v, torch.nn.Module)]
        if len(modules) == 1:
            return modules[0].state_dict()
        for value in inner:
            found = _state_of(value)
            if found:
                return found
    return {}


def _child(source: str, out: str, code: list[str]) -> int:
    """In the child process: run the --code files' definitions where the pickle looks for them, unpickle, write the
    weights as safetensors."""
    import runpy

    import torch
    from safetensors.torch import save

    main = sys.modules["__main__"]
    for file in code:
        sys.path.insert(0, str(Path(file).parent))
        for name, value in runpy.run_path(file, run_name=CHILD_NAMESPACE).items():
            if not name.startswith("__"):
                setattr(main, name, value)
    obj = torch.load(source, map_location="cpu", weights_only=False)
    state = _state_of(obj)
    if not state:
        print(f"ConvertError: the file holds a {type(obj).__name__} with no module or tensors in it", file=sys.stderr)
        return 2
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    try:
        data = save(tensors)
    except RuntimeError:  # tensors sharing memory (tied weights) are saved as copies
        data = save({k: v.clone() for k, v in tensors.items()})
    with atomic_open(out, "wb") as handle:
        handle.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2], sys.argv[3:]))
