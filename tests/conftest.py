"""Shared fixtures. Every test runs with outbound network access blocked (loopback stays open for the notebook
kernel), so nothing in the package can quietly reach a model hub."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from kaggle_i2p.dryrun import bundled_sample_dir
from kaggle_i2p.toy import build_toy_ensemble

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


@pytest.fixture
def sample_images(tmp_path, sample_dir) -> Path:
    """A writable copy of the 7 real Kaggle sample images."""
    out = tmp_path / "images"
    shutil.copytree(sample_dir / "images", out)
    return out
