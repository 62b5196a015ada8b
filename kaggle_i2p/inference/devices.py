"""The device a run uses and what runs there: `auto` and lists of devices, the precision a tower gets on a device,
and whether its views may be compiled (CUDA where Triton runs)."""

from __future__ import annotations

import logging

import torch

from ..core.errors import OptionError

log = logging.getLogger("kaggle_i2p")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` means CUDA when available, else CPU; an unknown device or a CUDA device without a GPU is an
    OptionError, raised before anything loads."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise OptionError(f"device {str(device)!r} is not a device: use auto, cpu, cuda or cuda:N") from err
    if resolved.type not in ("cpu", "cuda"):
        raise OptionError(f"device {str(device)!r}: kaggle_i2p runs on cpu or cuda (cuda:N); use auto, cpu or cuda")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"device {str(device)!r}: no CUDA GPU is visible here (torch.cuda.is_available() is "
                              "False); use --device cpu, or auto to take the GPU when there is one")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise OptionError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                              "(cuda:0 is the first)")
    return resolved


def resolve_devices(device: str | torch.device = "auto") -> tuple[torch.device, ...]:
    """The devices a run uses: `auto` takes every visible GPU (data-parallel when there are several), a comma list
    (`cuda:0,cuda:1`) names them; anything else is the one device `resolve_device` gives."""
    if str(device) == "auto" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return tuple(torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count()))
    names = str(device).split(",")
    return tuple(resolve_device(name.strip()) for name in names) if len(names) > 1 else (resolve_device(device),)


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` is fp16 autocast on CUDA (T4/P100 have no bf16) and fp32 on CPU; fp16 on CPU falls back to fp32."""
    if requested == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if requested in ("fp16", "fp16-weights") and device.type == "cpu":
        log.info("%s on CPU is slow and imprecise; using fp32 (use bf16 for reduced precision on CPU)", requested)
        return "fp32"
    return requested


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_compile(requested: bool, device: torch.device) -> bool:
    """Whether a tower's views are compiled: when asked, on CUDA where Triton runs (compute capability 7.0 and up:
    a P100 has none). Off on CPU. Where it cannot run, one log line and eager."""
    if not requested:
        return False
    if device.type != "cuda":
        log.info("compile: off on %s (it is for CUDA; the towers run eager)", device.type)
        return False
    major, minor = torch.cuda.get_device_capability(device)
    triton = _triton_available()
    if major < 7 or not triton:
        log.info("compile: off on this GPU (compute capability %d.%d%s; Triton needs 7.0 and up); the towers run "
                 "eager", major, minor, "" if triton else ", Triton not installed")
        return False
    return True


