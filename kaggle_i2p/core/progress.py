"""Progress lines for the steps that take seconds before any bar can start: reading and checking towers (inspect,
validate-manifest --deep, plan). One line per step on stderr, so `--json` output stays clean; the command line turns
them on, library calls stay silent, and a line that cannot be written is dropped (an optional helper, never fatal)."""

from __future__ import annotations

import sys
import time

_state = {"on": False, "start": 0.0}


def enable(on: bool = True) -> None:
    """Say each step from now on (the CLI's inspect, validate-manifest and plan; not under --quiet)."""
    _state.update(on=on, start=time.perf_counter())


def say(what: str) -> None:
    """One progress line, `kaggle_i2p [12.3 s] what`, the time since the command started; nothing when off."""
    if not _state["on"]:
        return
    try:
        print(f"kaggle_i2p [{time.perf_counter() - _state['start']:5.1f} s] {what}", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # a closed or broken stderr: the step goes on without its line
        pass


def size_text(n_bytes: int) -> str:
    """A file size as people read it: 812 KB, 1.2 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"
