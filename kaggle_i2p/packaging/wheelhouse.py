"""`kaggle-i2p pack-wheels`: a folder of wheels that installs kaggle_i2p offline on Kaggle.

It builds our wheel, walks its requirements (and theirs) through the installed distributions, leaves out what the
Kaggle image already provides (torch, torchvision, numpy, pillow and everything they need: replacing those breaks the
image), and downloads the rest as wheels at the versions tested here. On Kaggle:
`pip install --no-index --find-links /kaggle/input/<wheels> kaggle_i2p`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from ..core.errors import I2PError
from ..core.fileio import atomic_open

DEFAULT_PROVIDED = ("torch", "torchvision", "numpy", "pillow")


class WheelhouseError(I2PError, RuntimeError):
    """The wheelhouse cannot be built: no source tree, or pip failed (its output is in the message)."""


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(requires: Iterable[str], extras: Sequence[str] = ()) -> list:
    from packaging.requirements import Requirement

    wanted = []
    for line in requires:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            wanted.append(req)
    return wanted


def installed_closure(roots: Iterable[str], extras: Sequence[str] = ()) -> dict[str, str | None]:
    """{canonical name: installed version or None} of `roots` and everything they require, transitively.

    Each requirement's marker is evaluated once, against the extras requested of the distribution that declares it.
    """
    found: dict[str, str | None] = {}
    stack = _requirements(roots, extras)
    while stack:
        req = stack.pop()
        name = canonical(req.name)
        if name in found:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            found[name] = None
            continue
        found[name] = dist.version
        stack.extend(_requirements(dist.requires or [], tuple(req.extras)))
    return found


def wheel_requirements(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a built wheel."""
    with zipfile.ZipFile(wheel) as archive:
        meta_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(archive.read(meta_name).decode("utf-8"))
    return message.get_all("Requires-Dist") or []


MARKER = ".kaggle_i2p_wheelhouse"  # in every folder pack-wheels wrote: the one kind of folder it writes into again


def check_wheelhouse_folder(out_dir: Path) -> None:
    """`--out` must be a new or empty folder, or one pack-wheels wrote (its marker, or from before the marker: our
    wheel beside a requirements.txt that starts with it); any other folder is refused and left untouched, so a user's
    own requirements.txt or wheels are never replaced."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise WheelhouseError(f"--out {out_dir} is a file; give a folder for the wheelhouse")
    entries = list(out_dir.iterdir())
    if not entries or (out_dir / MARKER).is_file():
        return
    requirements = out_dir / "requirements.txt"
    ours = any(out_dir.glob("kaggle_i2p-*.whl")) and requirements.is_file() and \
        requirements.read_text(encoding="utf-8", errors="replace").startswith(("kaggle_i2p==", "kaggle-i2p=="))
    if not ours:
        names = ", ".join(sorted(p.name for p in entries)[:5]) + (" ..." if len(entries) > 5 else "")
        raise WheelhouseError(f"--out {out_dir} holds files pack-wheels did not write ({names}); it is left as it "
                              "is: give a new or empty folder")


def find_source_dir(source: str | Path | None) -> Path:
    """The kaggle_i2p source tree: the given one, or the checkout this module runs from."""
    candidate = Path(source).expanduser().resolve() if source else Path(__file__).resolve().parents[2]
    if not (candidate / "setup.py").is_file():  # absolute: pip reads a bare relative name as a package name
        raise WheelhouseError(f"{candidate} is not a kaggle_i2p source tree (no setup.py); pass --source DIR")
    return candidate


@dataclass
class Wheelhouse:
    """What pack-wheels wrote."""

    directory: Path
    own_wheel: Path
    packed: dict[str, str | None]
    provided: list[str]

    def __str__(self) -> str:
        wheels = sorted(p.name for p in self.directory.glob("*.whl"))
        return (f"wheelhouse {self.directory}: {len(wheels)} wheels ({self.own_wheel.name} + "
                f"{len(self.packed)} dependencies); left to the target image: {', '.join(self.provided)}\n"
                f"install offline with: pip install --no-index --find-links {self.directory} kaggle_i2p")


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        tail = "\n".join((result.stdout + "\n" + result.stderr).strip().splitlines()[-15:])
        raise WheelhouseError(f"{' '.join(command[2:5])} ... failed (exit {result.returncode}); pip said:\n{tail}\n"
                              "fix: check the network to the package index, --python-version/--platform, and the "
                              "versions installed here")


def pack_wheels(out_dir: str | Path, source: str | Path | None = None, provided: Sequence[str] = DEFAULT_PROVIDED,
                extras: Sequence[str] = (), extra_packages: Sequence[str] = (), python_version: str | None = None,
                platforms: Sequence[str] | None = None) -> Wheelhouse:
    """Build our wheel and download the wheels of every dependency the target image does not provide."""
    out_dir = Path(out_dir)
    source_dir = find_source_dir(source)
    check_wheelhouse_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("a wheelhouse written by `kaggle-i2p pack-wheels`; it replaces its own files\n")
    for old in out_dir.glob("kaggle_i2p-*.whl"):
        old.unlink()
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out_dir),
          str(source_dir)])
    own_wheel = max(out_dir.glob("kaggle_i2p-*.whl"), key=lambda p: p.stat().st_mtime)

    provided_closure = installed_closure(provided)
    wanted = installed_closure([*wheel_requirements(own_wheel), *extra_packages], extras)
    packed = {name: version for name, version in sorted(wanted.items()) if name not in provided_closure}
    if packed:
        specs = [f"{name}=={version}" if version else name for name, version in packed.items()]
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "-d", str(out_dir)]
        if python_version:
            command += ["--python-version", python_version]
        for platform in platforms or []:
            command += ["--platform", platform]
        _run(command + specs)
    lines = [f"{own_wheel.name.split('-')[0]}=={own_wheel.name.split('-')[1]}"]
    lines += [f"{n}=={v}" if v else n for n, v in packed.items()]
    with atomic_open(out_dir / "requirements.txt") as handle:
        handle.write("\n".join(lines) + "\n")
    return Wheelhouse(out_dir, own_wheel, packed, sorted(provided_closure))
