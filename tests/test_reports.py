"""Issue 34, part 3: `evaluate --report DIR` and `tune --report DIR` write a page a person looks at. The page is
parsed: every image it shows is a PNG in the folder, and its tables hold the run's own numbers (those `--json`
prints); the worst images carry their prompt and what a caption tower read; a bad folder or a missing matplotlib is
one message before the compute; in a notebook the same report displays inline."""

from __future__ import annotations

import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from kaggle_i2p.cli import main
from kaggle_i2p.core.ensemble import l2_normalize
from kaggle_i2p.inference.predict import PredictionRun
from kaggle_i2p.tuning.evaluate import evaluate_run
from kaggle_i2p.tuning.report import MARKER, build_report, evaluate_dir


class Page(HTMLParser):
    """The images, table cells and text of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[str] = []
        self.cells: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _page(folder: Path) -> Page:
    page = Page((folder / "index.html").read_text(encoding="utf-8"))
    for src in page.images:  # every image the page shows is a PNG beside it
        assert "/" not in src and (folder / src).is_file(), src
        with Image.open(folder / src) as image:
            assert image.format == "PNG" and min(image.size) > 20
    return page


def test_evaluate_report_holds_the_runs_numbers(toy_manifest, sample_images, sample_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", str(sample_images), "--prompts", str(sample_dir / "prompts.csv"), "--manifest",
                 str(toy_manifest), "--device", "cpu", "--workers", "0", "--no-cache", "--json", "--quiet",
                 "--report", str(out)]) == 0
    printed = capsys.readouterr()
    numbers = json.loads(printed.out)
    assert f"wrote {out / 'index.html'}" in printed.err
    page = _page(out)
    assert {"scores.png", "per_image.png", "towers.png"} <= set(page.images)
    assert sum(src.startswith("worst_") for src in page.images) == 7  # every sample image is among the 8 worst
    cells = page.cells
    for label, value in [("ensemble (manifest weights)", numbers["ensemble"]), ("the prior alone", numbers["prior"]),
                         ("equal weights", numbers["equal_weights"])]:
        assert cells[cells.index(label) + 1] == f"{value:.4f}"
    for tower, score in numbers["per_tower"].items():
        assert cells[cells.index(f"tower {tower}") + 1] == f"{score:.4f}"
        assert cells[cells.index(f"tower {tower}") + 3] == f"{numbers['view_agreement'][tower]:.4f}"
    for view, score in numbers["per_view"].items():
        assert f"{score:.4f}" in cells and f"view {view.split('/', 1)[1]}" in cells
    with open(sample_dir / "prompts.csv", newline="") as handle:
        prompts = {row["imgId"]: row["prompt"] for row in csv.DictReader(handle)}
    worst = min(prompts, key=lambda i: cells.index(i) if i in cells else 10**6)  # the first row of the worst images
    assert cells[cells.index(worst) + 4] == prompts[worst]  # carries its prompt
    assert (out / MARKER).is_file()

    # written again into its own folder; a folder of the user's is refused before the compute, untouched
    assert main(["evaluate", str(sample_images), "--prompts", str(sample_dir / "prompts.csv"), "--manifest",
                 str(toy_manifest), "--device", "cpu", "--workers", "0", "--quiet", "--report", str(out)]) == 0
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["evaluate", str(sample_images), "--prompts", str(sample_dir / "prompts.csv"), "--manifest",
                 str(toy_manifest), "--quiet", "--report", str(theirs)]) == 2
    err = capsys.readouterr()
    assert "holds files no report wrote; it is left as it is" in err.err and "evaluation on" not in err.out
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]


def test_tune_report_shows_each_fold_out_of_fold(toy_manifest, sample_images, sample_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["tune", str(sample_images), "--prompts", str(sample_dir / "prompts.csv"), "--manifest",
                 str(toy_manifest), "--out", str(tmp_path / "tuned.yaml"), "--folds", "3", "--device", "cpu",
                 "--workers", "0", "--no-cache", "--json", "--quiet", "--report", str(out)]) == 0
    numbers = json.loads(capsys.readouterr().out)
    page = _page(out)
    assert "tuning.png" in page.images
    cells = page.cells
    names = list(numbers["oof"])
    assert len(numbers["per_fold"]) == 3
    for fold, scores in numbers["per_fold"].items():
        row = cells.index(f"fold {fold}")
        assert cells[row + 1: row + 1 + len(names)] == [f"{scores[n]:.4f}" for n in names]
    row = cells.index("all folds (out of fold)")
    assert cells[row + 1: row + 1 + len(names)] == [f"{numbers['oof'][n]:.4f}" for n in names]
    for tower, weight in numbers["weights"].items():
        assert cells[cells.index(tower, row) + 1] == f"{weight:.4f}"
    text = " ".join(page.text)
    assert "tuning" in text and ("generalises" in text or "does NOT beat" in text or "cannot show" in text)


def _stub_run() -> tuple[PredictionRun, SimpleNamespace, np.ndarray]:
    """Three towers on five images with known per-image scores: a caption tower among them."""
    rng = np.random.default_rng(0)
    targets = l2_normalize(rng.normal(size=(5, 384)).astype(np.float32))
    noise = l2_normalize(rng.normal(size=(5, 384)).astype(np.float32))
    towers = {"good": l2_normalize(targets + 0.3 * noise), "same": l2_normalize(targets + 0.31 * noise),
              "caption": l2_normalize(rng.normal(size=(5, 384)).astype(np.float32))}
    run = PredictionRun(ids=[f"img{i}" for i in range(5)], embeddings=l2_normalize(sum(towers.values())),
                        tower_embeddings=towers, view_outputs={t: {"r224": v} for t, v in towers.items()},
                        summary=None, texts={"caption": {"r224": [f"a caption <{i}>" for i in range(5)]}})
    fallback = l2_normalize(np.ones(384, np.float32))
    manifest = SimpleNamespace(fallback=fallback, path=Path("m.yaml"),
                               towers=[SimpleNamespace(name=t, weight=1.0) for t in towers])
    return run, manifest, targets


def test_the_page_is_made_of_the_numbers_and_displays_inline(tmp_path):
    run, manifest, targets = _stub_run()
    evaluation = evaluate_run(run, manifest, targets)
    report = build_report(run, manifest, targets, evaluation, prompts={"img0": "a <b>bold</b> prompt"})
    folder = tmp_path / "r"
    report.write(folder)
    page = _page(folder)
    cells = page.cells
    scores = {t: np.sum(v * targets, axis=1) for t, v in run.tower_embeddings.items()}
    expected = np.corrcoef(np.stack(list(scores.values())))
    row = cells.index("good", cells.index("caption"))  # the correlation table's first row
    assert cells[row + 1: row + 4] == [f"{v:.4f}" for v in expected[0]]
    assert float(cells[row + 2]) > 0.99  # two towers that fail on the same images correlate near 1
    assert "a caption <0>" in cells and "caption reads" in cells  # what the caption tower read, escaped as text
    assert "a <b>bold</b> prompt" in cells
    assert "<b>bold" not in (folder / "index.html").read_text()  # the prompt is text, never markup

    inline = report._repr_html_()
    assert inline.count("data:image/png;base64,") == len(page.images) and "file:" not in inline
    assert 'src="worst_' not in inline


def test_a_report_needs_matplotlib_before_the_compute(monkeypatch, toy_manifest, sample_images, sample_dir,
                                                      tmp_path, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert main(["evaluate", str(sample_images), "--prompts", str(sample_dir / "prompts.csv"), "--manifest",
                 str(toy_manifest), "--report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib (or kaggle_i2p[report])" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("folds", [None, 3])
def test_evaluate_dir_in_a_notebook(folds, toy_manifest, sample_images, sample_dir):
    report = evaluate_dir(sample_images, toy_manifest, prompts=sample_dir / "prompts.csv", folds=folds,
                          device="cpu", num_workers=0, progress=False)
    assert (report.tuning is not None) == bool(folds)
    html = report._repr_html_()
    assert f"{report.evaluation.ensemble:.4f}" in html and html.count("data:image/png;base64,") >= 3
    if folds:
        assert f"{report.tuning.oof['tuned']:.4f}" in html
        png = html.split("data:image/png;base64,")[1].split('"')[0]
        assert Image.open(io.BytesIO(__import__("base64").b64decode(png))).format == "PNG"
