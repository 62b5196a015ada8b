"""The Kaggle submission notebook runs top to bottom (nbclient) against the bundled sample and the toy towers."""

from pathlib import Path

import nbformat
import numpy as np
from nbclient import NotebookClient

from kaggle_i2p.dryrun import sample_targets
from kaggle_i2p.submission import check_format, read_submission

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_executes_and_writes_a_valid_submission(tmp_path, sample_dir, toy_manifest, monkeypatch):
    out = tmp_path / "working" / "submission.csv"
    monkeypatch.setenv("I2P_WHEELS", str(tmp_path / "no-wheels-needed"))
    monkeypatch.setenv("I2P_MANIFEST", str(toy_manifest))
    monkeypatch.setenv("I2P_IMAGES", str(sample_dir / "images"))
    monkeypatch.setenv("I2P_OUT", str(out))
    monkeypatch.setenv("I2P_DEVICE", "cpu")
    monkeypatch.setenv("I2P_WORKERS", "0")
    monkeypatch.setenv("I2P_CACHE", str(tmp_path / "cache"))
    notebook = nbformat.read(ROOT / "notebooks" / "kaggle_submission.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    assert check_format(out, sample_dir / "sample_submission.csv").ok
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 4 + 2  # one chunk x (4 + 2) views, resumable
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    for expected in ["2 towers from", "kaggle_i2p: 7 images, 2 towers", "7 images, 2688 rows"]:
        assert expected in printed
    values = read_submission(out)["val"].to_numpy(np.float32).reshape(7, 384)
    assert np.allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5)
    assert values.shape == sample_targets(sample_dir / "sample_submission.csv")[1].shape
