"""Shared fixtures. Every test runs with outbound network access blocked (loopback stays open for the notebook
kernel), so nothing in the package can quietly reach a model hub, and with HOME and KAGGLE_I2P_CACHE in a temporary
folder, so the suite writes nothing into the user's home (the demo ensemble is built there once per session)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

_HERMETIC_HOME = Path(tempfile.mkdtemp(prefix="kaggle_i2p-tests-home-"))
_REAL_HOME = os.environ.get("HOME", "")
os.environ["HOME"] = str(_HERMETIC_HOME)  # set before the package is imported: nothing may reach ~/.cache
os.environ["KAGGLE_I2P_CACHE"] = str(_HERMETIC_HOME / ".cache" / "kaggle_i2p")
os.environ.pop("KAGGLE_KERNEL_RUN_TYPE", None)


def pytest_unconfigure(config) -> None:
    shutil.rmtree(_HERMETIC_HOME, ignore_errors=True)

from kaggle_i2p.inference.dryrun import bundled_sample_dir  # noqa: E402 - after HOME is redirected
from kaggle_i2p.testing import build_toy_ensemble  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class NetworkBlocked(RuntimeError):
    pass


def _is_loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    return isinstance(host, str) and (host in ("localhost", "::1") or host.startswith("127.") or host.startswith("/"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any connection that leaves the machine."""
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        if self.family == socket.AF_UNIX or _is_loopback(address):
            return real_connect(self, address)
        raise NetworkBlocked(f"test tried to reach the network: {address}")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: (_ for _ in ()).throw(
        NetworkBlocked(f"test tried to reach the network: {address}")) if not _is_loopback(address) else
        socket.create_connection.__wrapped__(address, *a, **k))
    yield


socket.create_connection.__wrapped__ = socket.create_connection  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return bundled_sample_dir()


@pytest.fixture(scope="session")
def toy_manifest(tmp_path_factory) -> Path:
    """Two tiny random-weight towers (timm test_vit + tiny open_clip ViT) saved as safetensors, with a manifest."""
    return build_toy_ensemble(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="session")
def demo_manifest() -> Path:
    """The real-weight demo ensemble, built once per session where `--manifest demo` finds it (the hermetic cache)."""
    from kaggle_i2p.demo.ensemble import build_demo_ensemble

    return build_demo_ensemble()


@pytest.fixture
def sample_images(tmp_path, sample_dir) -> Path:
    """A writable copy of the 7 real Kaggle sample images."""
    out = tmp_path / "images"
    shutil.copytree(sample_dir / "images", out)
    return out


# The bad-input corpus: the 7 real sample images plus every kind of file a competitor's folder can hold. Used by the
# predict, evaluate and notebook tests; `CORPUS` says what each entry must become.
def dying_embedder(original, seen: list, kill_at: list, error: type[BaseException]):
    """An embedder factory standing in for `bankbuild.minilm_embedder`: it records each shard's size in `seen` and
    raises `error` at the calls numbered in `kill_at` (a kill or a Ctrl-C in the middle of a shard)."""
    def factory(*args):
        embed = original(*args)

        def run(texts):
            seen.append(len(texts))
            if len(seen) in kill_at:
                raise error
            return embed(texts)
        return run
    return factory


CORPUS_FALLBACK = {"zero_bytes": "unreadable image (empty file)", "truncated": None, "random_bytes": None,
                   "huge": None, "float_out_of_range": None}  # None: the decoder's own message
CORPUS_CONVERTED = {"gray16": "16-bit I;16 pixels scaled to 8 bits", "float01": "float pixels scaled to 8 bits"}
CORPUS_PREDICTED = ["ünïcødé", "one_pixel", "gray16", "float01"]
CORPUS_SKIPPED = {"notes.txt": "not an image file by its suffix",
                  "subfolder": "a folder (only files directly in the image folder are predicted)",
                  "broken_link.png": "broken symbolic link"}


def build_bad_input_corpus(folder: Path, sample: Path, unsafe_ids: bool = False) -> Path:
    """Write the corpus into `folder`; `unsafe_ids` adds a comma and a quote in file names (refused before compute)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted((sample / "images").iterdir()):
        shutil.copy(path, folder / path.name)
    good = (sample / "images" / "20057f34d.png").read_bytes()
    shutil.copy(sample / "images" / "227ef0887.png", folder / "ünïcødé.png")
    (folder / "zero_bytes.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    (folder / "random_bytes.png").write_bytes(np.random.default_rng(0).bytes(4096))
    Image.new("1", (15_000, 15_000)).save(folder / "huge.png")  # a decompression bomb by PIL's limit, 30 kB on disk
    Image.new("RGB", (1, 1), (200, 30, 60)).save(folder / "one_pixel.png")
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    Image.fromarray(ramp).save(folder / "gray16.png")
    Image.fromarray(np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64), mode="F").save(folder / "float01.tif")
    Image.fromarray(np.full((48, 64), 7.5, dtype=np.float32), mode="F").save(folder / "float_out_of_range.tiff")
    (folder / "notes.txt").write_text("not an image")
    (folder / "subfolder").mkdir()
    shutil.copy(sample / "images" / "92e911621.png", folder / "subfolder" / "nested.png")
    (folder / "broken_link.png").symlink_to(folder / "no_such_file.png")
    if unsafe_ids:
        shutil.copy(sample / "images" / "a4e1c55a9.png", folder / "a,b.png")
        shutil.copy(sample / "images" / "a4e1c55a9.png", folder / 'say "hi".png')
    return folder


@pytest.fixture
def bad_inputs(tmp_path, sample_dir) -> Path:
    """A folder holding the bad-input corpus (see CORPUS_*)."""
    return build_bad_input_corpus(tmp_path / "bad_inputs", sample_dir)
