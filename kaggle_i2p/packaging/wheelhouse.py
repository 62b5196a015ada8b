"""`kaggle-i2p pack-wheels`: a folder of wheels that installs kaggle_i2p offline on Kaggle.

It builds our wheel, resolves it with pip's own resolver for the target interpreter and platform (`--python-version`,
`--platform`: Kaggle's image moves its Python), leaves out what the Kaggle image already provides (torch, torchvision,
numpy, pillow and everything they need: replacing those breaks the image), and downloads the rest as wheels, at the
versions tested here wherever the target has wheels of them all (else at pip's choice, each difference listed). On
Kaggle:
`pip install --no-index --find-links /kaggle/input/<wheels> kaggle_i2p`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from ..core.errors import I2PError
from ..core.fileio import atomic_open, ours_to_write

DEFAULT_PROVIDED = ("torch", "torchvision", "numpy", "pillow")


class WheelhouseError(I2PError, RuntimeError):
    """The wheelhouse cannot be built: no source tree, or pip failed (its output is in the message)."""


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(requires: Iterable[str], extras: Sequence[str] = (), env: dict | None = None) -> list:
    """The requirements whose marker holds for the extras asked for, in `env` (a target's marker environment;
    default: this interpreter's)."""
    from packaging.requirements import Requirement

    wanted = []
    for line in requires:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**(env or {}), "extra": e}) for e in ("", *extras)):
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


MAX_ROUNDS = 5  # resolutions pack-wheels makes to close the target's requirements (one or two in practice)
MARKER = ".kaggle_i2p_wheelhouse"  # in every folder pack-wheels wrote: the one kind of folder it writes into again


def check_wheelhouse_folder(out_dir: Path) -> None:
    """`--out` must be a new or empty folder, or one pack-wheels wrote (its marker, or from before the marker: our
    wheel beside a requirements.txt that starts with it); any other folder is refused and left untouched, so a user's
    own requirements.txt or wheels are never replaced."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise WheelhouseError(f"--out {out_dir} is a file; give a folder for the wheelhouse")
    if ours_to_write(out_dir, MARKER):
        return
    entries = list(out_dir.iterdir())
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
    project = candidate / "pyproject.toml"  # absolute: pip reads a bare relative name as a package name
    if not (project.is_file() and re.search(r'^name\s*=\s*"kaggle[_-]i2p"', project.read_text(encoding="utf-8"),
                                            re.MULTILINE)):
        raise WheelhouseError(f"{candidate} is not a kaggle_i2p source tree (no pyproject.toml naming kaggle_i2p); "
                              "pass --source DIR")
    return candidate


@dataclass
class Wheelhouse:
    """What pack-wheels wrote."""

    directory: Path
    own_wheel: Path
    packed: dict[str, str | None]
    provided: list[str]
    target: str = "this Python"
    # {name: (version packed, version tested here)} where the target has not the tested version (pip chose)
    differ: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __str__(self) -> str:
        wheels = sorted(p.name for p in self.directory.glob("*.whl"))
        lines = [f"wheelhouse {self.directory} for {self.target}: {len(wheels)} wheels ({self.own_wheel.name} + "
                 f"{len(self.packed)} dependencies); left to the target image: {', '.join(self.provided)}"]
        if self.differ:
            lines.append(f"not the versions tested here ({len(self.differ)}; the target has no wheel of those): "
                         + ", ".join(f"{n} {got} ({was} here)" for n, (got, was) in sorted(self.differ.items())))
        lines.append(f"install offline with: pip install --no-index --find-links {self.directory} kaggle_i2p")
        return "\n".join(lines)


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise WheelhouseError(_pip_failed(command, result))
    return result


def _pip_failed(command: list[str], result: subprocess.CompletedProcess) -> str:
    said = [line for line in (result.stdout + "\n" + result.stderr).strip().splitlines() if "is ignored" not in line]
    return (f"{' '.join(command[2:5])} ... failed (exit {result.returncode}); pip said:\n" + "\n".join(said[-15:])
            + "\nfix: check the network to the package index, --python-version/--platform, and the versions "
              "installed here")


LEGACY_MANYLINUX = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}  # PEP 600's glibc of each alias


def expand_platforms(platforms: Sequence[str]) -> list[str]:
    """Each platform with every older manylinux it runs (a glibc 2.28 machine runs manylinux_2_17 and manylinux2014
    wheels too), as pip does for its own machine but not for --platform: numpy's manylinux2014 wheel is then found
    for `--platform manylinux_2_28_x86_64`."""
    out: list[str] = []
    for platform in platforms:
        match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
        legacy = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(\w+)", platform)
        glibc, arch = (int(match.group(1)), match.group(2)) if match else \
            (LEGACY_MANYLINUX[legacy.group(1)], legacy.group(2)) if legacy else (None, None)
        found = [platform]
        if glibc is not None:
            found += [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)]
            found += [f"{alias}_{arch}" for alias, minor in LEGACY_MANYLINUX.items() if minor <= glibc]
        for tag in found:
            if tag not in out:
                out.append(tag)
    return out


@dataclass(frozen=True)
class Target:
    """The interpreter and platforms the wheelhouse is for: pip's own target options (this Python when None)."""

    python_version: str | None = None
    platforms: tuple[str, ...] = ()

    def pip_options(self) -> list[str]:
        """pip's options that resolve and download for this target, binary wheels only."""
        options = ["--only-binary=:all:"]
        if self.python_version:
            options += ["--python-version", self.python_version, "--implementation", "cp"]
        for platform in expand_platforms(self.platforms):
            options += ["--platform", platform]
        return options

    def markers(self, environment: dict) -> dict:
        """The marker environment of the target: pip's report of this one with the target's Python."""
        env = dict(environment)
        if self.python_version:
            version = self.python_version if self.python_version.count(".") else \
                f"{self.python_version[0]}.{self.python_version[1:]}"
            env["python_version"] = ".".join(version.split(".")[:2])
            env["python_full_version"] = version if version.count(".") == 2 else f"{version}.0"
        return env

    def __str__(self) -> str:
        python = f"Python {self.python_version}" if self.python_version else f"Python {sys.version_info.major}." \
            f"{sys.version_info.minor}"
        return python + (f" on {', '.join(self.platforms)}" if self.platforms else " on this platform")


def resolve(requested: Sequence[str], target: Target, prefer: Mapping[str, str]) -> dict:
    """pip's resolution of `requested` for `target` without installing anything (`pip install --dry-run --report`),
    at the versions in `prefer` (those tested here) wherever the target has them: a preferred version the target has
    no wheel of is let go, one at a time as pip names them (all of them when pip names none), and pip resolves it."""
    prefer = dict(prefer)
    with tempfile.TemporaryDirectory() as tmp:
        report, constraints = Path(tmp) / "report.json", Path(tmp) / "tested.txt"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--report", str(report), "--target", str(Path(tmp) / "target"), *target.pip_options(), *requested]
        while True:
            constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(prefer.items())))
            result = subprocess.run([*command, "-c", str(constraints)], capture_output=True, text=True)
            if result.returncode == 0:
                return json.loads(report.read_text(encoding="utf-8"))
            if not prefer:
                raise WheelhouseError(_pip_failed(command, result))
            missing = {canonical(m) for m in re.findall(r"(?:No matching distribution found for|Could not find a "
                                                        r"version that satisfies the requirement) ([\w.-]+)==",
                                                        result.stderr)} & set(prefer)
            prefer = {n: v for n, v in prefer.items() if n not in missing} if missing else {}


def requirement_closure(report: dict, roots: Iterable[tuple[str, Sequence[str]]], target: Target
                        ) -> tuple[set[str], set[str]]:
    """(the canonical names `roots` (name, extras) reach in pip's resolution, transitively, each marker evaluated
    for the target; the requirements they reach that the resolution lacks). pip evaluates markers for the Python
    it runs on, whatever --python-version says: a 3.10 target's `tomli; python_version < "3.11"` is missed when
    pip runs on 3.11, and is found here."""
    requires = {canonical(item["metadata"]["name"]): item["metadata"].get("requires_dist") or []
                for item in report["install"]}
    env = target.markers(report.get("environment") or {})
    found: set[str] = set()
    missing: set[str] = set()
    stack = [(canonical(name), tuple(extras)) for name, extras in roots]
    while stack:
        name, extras = stack.pop()
        if name in found:
            continue
        found.add(name)
        for req in _requirements(requires[name], extras, env):
            if canonical(req.name) in requires:
                stack.append((canonical(req.name), tuple(req.extras)))
            else:
                req.marker = None
                missing.add(str(req))
    return found, missing


def pack_wheels(out_dir: str | Path, source: str | Path | None = None, provided: Sequence[str] = DEFAULT_PROVIDED,
                extras: Sequence[str] = (), extra_packages: Sequence[str] = (), python_version: str | None = None,
                platforms: Sequence[str] | None = None, tested: Mapping[str, str] | None = None) -> Wheelhouse:
    """Build our wheel, resolve it with pip for the target Python and platform, and download the wheels of every
    dependency the target image does not provide: at the versions tested here (`tested`, default: this
    environment's) where the target has wheels of them, else at the versions pip resolves for the target."""
    out_dir = Path(out_dir)
    source_dir = find_source_dir(source)
    target = Target(python_version, tuple(platforms or ()))
    check_wheelhouse_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("a wheelhouse written by `kaggle-i2p pack-wheels`; it replaces its own files\n")
    for old in out_dir.glob("kaggle_i2p-*.whl"):
        old.unlink()
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out_dir),
          str(source_dir)])
    own_wheel = max(out_dir.glob("kaggle_i2p-*.whl"), key=lambda p: p.stat().st_mtime)

    here_provided = installed_closure(provided)  # the image's own versions are never pinned to this machine's
    if tested is None:
        tested = {n: v for n, v in installed_closure([*wheel_requirements(own_wheel), *extra_packages],
                                                     extras).items() if v}
    prefer = {canonical(n): v for n, v in tested.items() if canonical(n) not in here_provided}
    requested = [f"kaggle_i2p[{','.join(extras)}] @ {own_wheel.resolve().as_uri()}" if extras
                 else str(own_wheel.resolve()), *extra_packages]
    from packaging.requirements import Requirement

    roots = [("kaggle-i2p", tuple(extras))] + [(Requirement(r).name, tuple(Requirement(r).extras))
                                               for r in extra_packages]
    for _ in range(MAX_ROUNDS):  # resolve, then again with what pip's own markers missed for the target
        report = resolve(requested, target, prefer)
        needed, missing = requirement_closure(report, roots, target)
        if not missing:
            break
        requested = [*requested, *sorted(missing)]
    else:
        raise WheelhouseError(f"the requirements for {target} did not close after {MAX_ROUNDS} resolutions; still "
                              f"missing: {', '.join(sorted(missing))}")
    left_out, _ = requirement_closure(report, [(name, ()) for name in provided], target)
    packed = {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]
              if canonical(item["metadata"]["name"]) in needed - left_out - {"kaggle-i2p"}}
    packed = dict(sorted(packed.items()))
    if packed:
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *target.pip_options(),
              "-d", str(out_dir), *(f"{name}=={version}" for name, version in packed.items())])
    lines = [f"{own_wheel.name.split('-')[0]}=={own_wheel.name.split('-')[1]}"]
    lines += [f"{n}=={v}" for n, v in packed.items()]
    with atomic_open(out_dir / "requirements.txt") as handle:
        handle.write("\n".join(lines) + "\n")
    differ = {n: (v, prefer[n]) for n, v in packed.items() if n in prefer and prefer[n] != v}
    return Wheelhouse(out_dir, own_wheel, packed, sorted(left_out), str(target), differ)
