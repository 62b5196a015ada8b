"""Issue 34, part 1: `pack-wheels --python-version X --platform P` resolves for that interpreter, not this one.

A local index of tiny wheels the test builds stands in for PyPI (pip runs with `--no-index`, this machine's pip
config off): some versions exist only for some Pythons (a cp311/cp312-only PyYAML release, a pandas release that
requires Python >= 3.11), and a requirement carries a marker for old Pythons (`tomli; python_version < "3.11"`, which
pip's resolver misses when it runs on 3.11 for a 3.10 target). For 3.10, 3.11 and 3.12 the wheelhouse holds what
that Python needs at the versions tested here where it has them, lists each difference, and leaves the image's
packages out; where that interpreter exists on this machine it installs offline into a venv of it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kaggle_i2p.packaging.wheelhouse import canonical, pack_wheels

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = "manylinux2014_x86_64"
PYTHONS = ("310", "311", "312")

# (name, version, tags, requires, requires_python); tags "py3" for a pure wheel, else per-Python binaries
INDEX = [
    ("torch", "2.5.0", "py3", ["typing-extensions", "filelock"], None),
    ("torchvision", "0.20.0", "py3", ["torch", "numpy", "pillow"], None),
    ("numpy", "2.0.0", "binary", [], None),
    ("pillow", "11.0.0", "binary", [], None),
    ("typing-extensions", "4.12.0", "py3", [], None),
    ("filelock", "3.16.0", "py3", [], None),
    ("pyyaml", "6.0.2", "binary", [], None),
    ("pyyaml", "6.0.3", "binary-311+", [], None),  # the tested release has no 3.10 wheel
    ("ruamel.yaml", "0.19.1", "py3", [], None),
    ("pandas", "2.2.0", "binary", ["numpy", "python-dateutil"], None),
    ("pandas", "3.0.0", "binary", ["numpy"], ">=3.11"),  # the tested release requires 3.11
    ("python-dateutil", "2.9.0", "py3", [], None),
    ("tqdm", "4.70.1", "py3", [], None),
    ("safetensors", "0.8.0", "abi3", [], None),
    ("packaging", "26.4", "py3", [], None),
    ("timm", "1.0.31", "py3", ["torch", "torchvision", "pyyaml", "huggingface-hub", "safetensors"], None),
    ("huggingface-hub", "1.0.0", "py3", ["filelock", 'tomli; python_version < "3.11"'], None),
    ("tomli", "2.2.1", "py3", [], None),
    ("open-clip-torch", "3.3.0", "py3", ["torch", "torchvision", "timm", "ftfy"], None),
    ("ftfy", "6.3.1", "py3", ["wcwidth"], None),
    ("wcwidth", "0.2.13", "py3", [], None),
]
TESTED = {"pyyaml": "6.0.3", "ruamel-yaml": "0.19.1", "pandas": "3.0.0", "tqdm": "4.70.1", "safetensors": "0.8.0",
          "packaging": "26.4", "timm": "1.0.31", "huggingface-hub": "1.0.0", "open-clip-torch": "3.3.0",
          "ftfy": "6.3.1", "wcwidth": "0.2.13"}
IMAGE = {"torch", "torchvision", "numpy", "pillow", "typing-extensions", "filelock"}


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _wheel(folder: Path, name: str, version: str, tag: str, requires: list[str], requires_python: str | None) -> None:
    """A real, installable wheel of one empty module, with its metadata."""
    dist = name.replace("-", "_").replace(".", "_")
    info = f"{dist}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += f"Requires-Python: {requires_python}\n" if requires_python else ""
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{dist}_stub.py": b"", f"{info}/METADATA": metadata.encode(),
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()}
    record = [_record_line(n, d) for n, d in files.items()] + [f"{info}/RECORD,,"]
    with zipfile.ZipFile(folder / f"{dist}-{version}-{tag}.whl", "w") as archive:
        for n, d in files.items():
            archive.writestr(n, d)
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("index")
    for name, version, kind, requires, requires_python in INDEX:
        if kind == "py3":
            tags = ["py3-none-any"]
        elif kind == "abi3":
            tags = [f"cp38-abi3-{PLATFORM}"]
        else:
            pythons = PYTHONS[1:] if kind == "binary-311+" else PYTHONS
            tags = [f"cp{v}-cp{v}-{PLATFORM}" for v in pythons]
        for tag in tags:
            _wheel(folder, name, version, tag, requires, requires_python)
    return folder


@pytest.fixture
def offline_pip(index, monkeypatch):
    """Every pip that pack-wheels runs sees only the local index: no network, no config of this machine's."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.delenv("PIP_CONSTRAINT", raising=False)
    return index


def _interpreter(version: str) -> Path | None:
    """This machine's Python `version` (3.10, ...), or None: on PATH, or under pyenv's versions."""
    dotted = f"{version[0]}.{version[1:]}"
    if sys.version_info[:2] == (int(version[0]), int(version[1:])):
        return Path(sys._base_executable)
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    found = sorted(home.glob(f".pyenv/versions/{dotted}.*/bin/python{dotted}"))
    which = subprocess.run(["which", f"python{dotted}"], capture_output=True, text=True).stdout.strip()
    return found[-1] if found else Path(which) if which else None


@pytest.mark.parametrize("version", PYTHONS)
def test_pack_wheels_resolves_for_the_target_python(version, offline_pip, tmp_path):
    dotted = f"{version[0]}.{version[1:]}"
    out = tmp_path / "wheels"
    house = pack_wheels(out, source=ROOT, python_version=dotted, platforms=[PLATFORM], tested=TESTED)

    old = version == "310"
    want = {**TESTED, **({"pyyaml": "6.0.2", "pandas": "2.2.0", "tomli": "2.2.1",
                             "python-dateutil": "2.9.0"} if old else {})}
    assert house.packed == dict(sorted(want.items()))
    assert house.differ == ({"pyyaml": ("6.0.2", "6.0.3"), "pandas": ("2.2.0", "3.0.0")} if old else {})
    assert IMAGE <= set(house.provided) and not IMAGE & set(house.packed)
    files = {p.name for p in out.glob("*.whl")}
    assert f"pyyaml-{want['pyyaml']}-cp{version}-cp{version}-{PLATFORM}.whl" in files  # the target's own binary
    assert not any(canonical(f.split("-")[0]) in IMAGE for f in files)
    lines = (out / "requirements.txt").read_text().splitlines()
    assert lines[0].startswith("kaggle_i2p==") and set(lines[1:]) == {f"{n}=={v}" for n, v in want.items()}
    printed = str(house)
    assert f"for Python {dotted} on {PLATFORM}" in printed
    assert ("pyyaml 6.0.2 (6.0.3 here)" in printed) == old

    python = _interpreter(version)
    if python is None:  # resolved and downloaded for it offline above; nothing here to install into
        return
    venv = tmp_path / "image"
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(venv)], check=True)
    target = venv / "bin" / "python"

    def pip(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pip", "--python", str(target), *args],
                              capture_output=True, text=True)

    image = pip("install", "--no-index", "--find-links", str(offline_pip), *sorted(IMAGE))  # the image's packages
    assert image.returncode == 0, image.stderr
    install = pip("install", "--no-index", "--find-links", str(out), "kaggle_i2p")
    assert install.returncode == 0, install.stdout + install.stderr
    listed = pip("list", "--format=freeze").stdout
    assert f"PyYAML=={want['pyyaml']}" in listed or f"pyyaml=={want['pyyaml']}" in listed
    assert ("tomli==2.2.1" in listed) == old
    assert pip("check").returncode == 0
