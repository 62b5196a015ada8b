"""The Kaggle submission notebook runs top to bottom (nbclient): on the bundled sample with the toy towers, and on the
bad-input corpus with the demo ensemble (a retrieval tower and a prior tower)."""

from pathlib import Path

import nbformat
import numpy as np
import pytest
from conftest import CORPUS_FALLBACK, CORPUS_PREDICTED
from nbclient import NotebookClient

from kaggle_i2p.inference.dryrun import sample_targets
from kaggle_i2p.inference.submission import check_format, read_submission
from kaggle_i2p.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IDS = ["20057f34d", "227ef0887", "92e911621", "a4e1c55a9", "c98f79f71", "d8edf2e40", "f27825b2c"]


def _execute(tmp_path, monkeypatch, manifest: str, images: Path) -> tuple[Path, str]:
    out = tmp_path / "working" / "submission.csv"
    monkeypatch.setenv("I2P_WHEELS", str(tmp_path / "no-wheels-needed"))
    monkeypatch.setenv("I2P_MANIFEST", manifest)
    monkeypatch.setenv("I2P_IMAGES", str(images))
    monkeypatch.setenv("I2P_OUT", str(out))
    monkeypatch.setenv("I2P_DEVICE", "cpu")
    monkeypatch.setenv("I2P_WORKERS", "0")
    monkeypatch.setenv("I2P_CACHE", str(tmp_path / "cache"))
    notebook = nbformat.read(ROOT / "notebooks" / "kaggle_submission.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    return out, printed


def test_notebook_executes_and_writes_a_valid_submission(tmp_path, sample_dir, toy_manifest, monkeypatch):
    out, printed = _execute(tmp_path, monkeypatch, str(toy_manifest), sample_dir / "images")
    assert check_format(out, sample_dir / "sample_submission.csv").ok
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 4 + 2  # one chunk x (4 + 2) views, resumable
    for expected in ["2 towers from", "ok   timm x regressor: 7 images served as the tower's own forward",
                     "ok   open_clip x regressor: 7 images", "plan for 16,000 images on cpu", "toy_open_clip_vit r80:",
                     "kaggle_i2p: 7 images, 2 towers", "7 images, 2688 rows"]:
        assert expected in printed  # the public sample: the run is planned first
    values = read_submission(out)["val"].to_numpy(np.float32).reshape(7, 384)
    assert np.allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5)
    assert values.shape == sample_targets(sample_dir / "sample_submission.csv")[1].shape


def test_notebook_with_a_prior_tower_on_the_bad_input_corpus(tmp_path, bad_inputs, demo_manifest, monkeypatch):
    out, printed = _execute(tmp_path, monkeypatch, "demo", bad_inputs)
    n = len(SAMPLE_IDS) + len(CORPUS_PREDICTED) + len(CORPUS_FALLBACK)
    assert "prior: prior (a constant vector), weight 0.5" in printed
    assert "efficientnet_lite0_imagenet_phrases: retrieval tf_efficientnet_lite0 @ [224]" in printed
    assert f"kaggle_i2p: {n} images, 2 towers" in printed and f"{len(CORPUS_FALLBACK)} fallbacks" in printed
    assert "plan for" not in printed  # more than the public sample: the run itself
    written = read_submission(out)
    assert len(written) == n * 384 and "ünïcødé_0" in set(written["imgId_eId"])
    values = written["val"].to_numpy(np.float32).reshape(n, 384)
    ids = list(dict.fromkeys(written["imgId_eId"].str.rsplit("_", n=1).str[0]))
    fallback = load_manifest(demo_manifest).fallback
    for image_id in CORPUS_FALLBACK:
        assert np.array_equal(values[ids.index(image_id)], fallback)


@pytest.mark.parametrize("text", ["every file the\n  manifest names: the fallback `.npy`",
                                  "a new Kaggle session starts with an empty /kaggle/working"])
def test_notebook_says_what_to_upload_and_when_it_resumes(text):
    source = "".join("".join(cell["source"]) for cell in nbformat.read(
        ROOT / "notebooks" / "kaggle_submission.ipynb", as_version=4).cells)
    assert text in source
