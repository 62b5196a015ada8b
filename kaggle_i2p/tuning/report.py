"""Reports a person looks at: `evaluate --report DIR` and `tune --report DIR` write one HTML page (index.html) and the
PNG charts it shows; in a notebook the same `Report` displays inline (`_repr_html_`, the charts embedded).

What a competitor decides from, in the order they read it: whether the numbers can be trusted (the warnings), every
tower and TTA view against the prior and the ensemble, the per-image scores against the prior, how alike the towers'
mistakes are (the correlation of their per-image scores: two towers that fail on the same images add little), the
tuning judged out of fold per fold, and the worst images with their prompt and what the caption towers read.
Charts are drawn with matplotlib's object API (no pyplot state, no display needed): the `[report]` extra.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.ensemble import mean_cosine
from ..core.errors import I2PError, OutputError
from ..core.fileio import atomic_open, ours_to_write
from ..inference.predict import PredictionRun
from ..manifest import Manifest
from .evaluate import EvaluationReport, TuningReport, view_predictions

MARKER = ".kaggle_i2p_report"  # in every folder a report was written to: the one kind of folder written into again
WORST = 8  # images shown in "the worst images"
THUMBNAIL = 160  # px, the longer side of a worst image's thumbnail


class ReportError(I2PError, ValueError):
    """The report cannot be written: matplotlib is missing, or --report names a folder of the user's."""


def check_report_folder(folder: str | Path) -> Path:
    """Before the compute: matplotlib imports, and `folder` is new, empty, or one a report was written to (its
    marker); any other folder is refused and left untouched."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ReportError(f"--report draws its charts with matplotlib, which is not installed: pip install "
                          f"matplotlib (or kaggle_i2p[report]) ({err})") from err
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--report {folder} is a file; give a folder for the report")
    if not ours_to_write(folder, MARKER):
        raise OutputError(f"--report {folder} holds files no report wrote; it is left as it is: give a new or empty "
                          "folder")
    return folder


@dataclass
class Chart:
    """One PNG chart of the page: its file name, what it shows, and its bytes."""

    name: str
    caption: str
    png: bytes


@dataclass
class Section:
    """A heading, its body (HTML: tables and paragraphs) and its charts."""

    heading: str
    body: str
    charts: list[Chart] = field(default_factory=list)


@dataclass
class Report:
    """A report page: written to a folder (`write`) or displayed inline in a notebook (`_repr_html_`)."""

    title: str
    sections: list[Section]
    files: dict[str, bytes] = field(default_factory=dict)  # further files the page shows (the worst images)
    evaluation: EvaluationReport | None = None  # the numbers it shows
    tuning: TuningReport | None = None

    def html(self, source: Callable[[str, bytes], str]) -> str:
        """The page, each image's `src` given by `source(name, bytes)`: a file name beside it, or a data URI."""
        parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_text(self.title)}"
                 f"</title>\n<style>{STYLE}</style></head>\n<body>\n<h1>{_text(self.title)}</h1>"]
        for section in self.sections:
            parts.append(f"<section><h2>{_text(section.heading)}</h2>\n{section.body}")
            for chart in section.charts:
                parts.append(f"<figure><img src=\"{source(chart.name, chart.png)}\" alt=\"{_text(chart.caption)}\">"
                             f"<figcaption>{_text(chart.caption)}</figcaption></figure>")
            parts.append("</section>")
        page = "\n".join(parts) + "\n</body></html>\n"
        for name, data in self.files.items():  # the worst images' thumbnails, referenced by name in the body
            page = page.replace(f"src=\"{FILE_REF}{name}\"", f"src=\"{source(name, data)}\"")
        return page

    def write(self, folder: str | Path) -> Path:
        """index.html and its PNGs in `folder` (new, empty, or an earlier report's), each written atomically."""
        folder = check_report_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text("a folder `kaggle-i2p evaluate/tune --report` writes; it replaces its own files\n")
        for name, data in self._images().items():
            with atomic_open(folder / name, "wb") as handle:
                handle.write(data)
        with atomic_open(folder / "index.html", "w", encoding="utf-8") as handle:
            handle.write(self.html(lambda name, _: html.escape(name, quote=True)))
        return folder / "index.html"

    def _images(self) -> dict[str, bytes]:
        return {**{c.name: c.png for s in self.sections for c in s.charts}, **self.files}

    def _repr_html_(self) -> str:
        """Inline in a notebook: the same page, its images embedded."""
        return self.html(lambda name, data: f"data:image/png;base64,{base64.b64encode(data).decode()}")


FILE_REF = "file:"  # how a section's body names one of the report's files, replaced by its src when rendered
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; } td, th { padding: .25em .7em; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.view td:first-child { padding-left: 2em; color: #555; } tr.key td { font-weight: 600; }
.warning { background: #fff4e5; border-left: 4px solid #f0a020; padding: .5em .8em; margin: .5em 0; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: .9em; } img { max-width: 100%; }
td.prompt { max-width: 520px; } img.thumb { width: 120px; }
"""


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(header: list[str], rows: list[list[object]], classes: list[str] | None = None) -> str:
    """An HTML table; floats as 4 decimals, right-aligned."""
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        cells = "".join(f"<td class=\"num\">{v:.4f}</td>" if isinstance(v, float) else
                        f"<td class=\"num\">{v}</td>" if isinstance(v, int) else f"<td>{_text(v)}</td>" for v in row)
        css = f" class=\"{classes[index]}\"" if classes and classes[index] else ""
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _png(draw: Callable, size: tuple[float, float]) -> bytes:
    """A chart drawn by `draw(figure)` as PNG bytes (matplotlib's object API: no global state, no display)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=100, layout="constrained")
    draw(figure)
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


@dataclass
class Scores:
    """Per-image cosines of every part of a run against its targets."""

    ensemble: np.ndarray
    prior: np.ndarray
    towers: dict[str, np.ndarray]
    views: dict[str, np.ndarray]  # "tower/view"


def per_image_scores(run: PredictionRun, manifest: Manifest, targets: np.ndarray) -> Scores:
    """Each image's cosine for the ensemble, the prior alone, each tower and each view."""
    views, _ = view_predictions(run, manifest.fallback)
    return Scores(ensemble=mean_cosine(run.embeddings, targets)[1],
                  prior=mean_cosine(np.tile(manifest.fallback, (len(run.ids), 1)), targets)[1],
                  towers={t: mean_cosine(out, targets)[1] for t, out in run.tower_embeddings.items()},
                  views={v: mean_cosine(out, targets)[1] for v, out in views.items()})


def build_report(run: PredictionRun, manifest: Manifest, targets: np.ndarray, evaluation: EvaluationReport,
                 tuning: TuningReport | None = None, prompts: dict[str, str] | None = None,
                 image_paths: dict[str, Path] | None = None) -> Report:
    """The page of an evaluation (and of a tuning, when given), its numbers those of `evaluation` and `tuning`."""
    scores = per_image_scores(run, manifest, targets)
    title = f"kaggle_i2p {'tuning' if tuning else 'evaluation'}: {manifest.path.name}, {len(run.ids)} images"
    sections = [_trust_section(evaluation, tuning), _scores_section(evaluation),
                _per_image_section(scores), _towers_section(scores)]
    if tuning is not None:
        sections.append(_tuning_section(tuning))
    worst, files = _worst_section(run, scores, prompts or {}, image_paths or {})
    return Report(title, [s for s in [*sections, worst] if s is not None], files, evaluation, tuning)


def evaluate_dir(image_dir: str | Path, manifest: str | Path | Manifest, *, prompts: str | Path | None = None,
                 targets: str | Path | None = None, folds: int | None = None, per_view: bool = False,
                 per_dim: bool = False, **options) -> Report:
    """In a notebook: evaluate (and with `folds`, tune out of fold) the manifest on labelled images and return the
    report, which displays inline; `.write(DIR)` keeps it, `.evaluation` and `.tuning` hold the numbers. `options`
    are RunOptions fields (device, batch_size, cache_dir, ...)."""
    from ..inference.images import list_images
    from ..inference.predict import run_prediction
    from ..manifest import as_manifest
    from .evaluate import evaluate_run, fold_numbers, load_targets, read_prompts, tune_run

    manifest = as_manifest(manifest)
    listing = list_images(image_dir)
    aligned = load_targets(list(listing.ids), prompts_csv=prompts, targets_npy=targets,
                           embedding_dim=manifest.embedding_dim)
    split = fold_numbers(list(listing.ids), folds, prompts_csv=prompts) if folds else None
    run = run_prediction(image_dir, manifest, include_zero_weight=True, **options)
    evaluation = evaluate_run(run, manifest, aligned)
    tuning = tune_run(run, manifest, aligned, split, per_view=per_view, per_dim=per_dim)[0] if folds else None
    texts = read_prompts(prompts)["prompt"].astype(str).to_dict() if prompts else None
    return build_report(run, manifest, aligned, evaluation, tuning, texts,
                        dict(zip(listing.ids, listing.paths, strict=True)))


def _trust_section(evaluation: EvaluationReport, tuning: TuningReport | None) -> Section:
    warnings = [*evaluation.warnings, *(tuning.warnings if tuning else [])]
    body = "".join(f"<p class=\"warning\">{_text(w)}</p>" for w in warnings) or \
        "<p>No warning: the ensemble beats the prior alone and every tower's views agree.</p>"
    return Section("Can these numbers be trusted?", body)


def _scores_section(evaluation: EvaluationReport) -> Section:
    (best_name, best_score), = evaluation.best_single.items()
    rows: list[list[object]] = [["ensemble (manifest weights)", evaluation.ensemble, "", ""],
                                ["equal weights", evaluation.equal_weights, "", ""],
                                [f"best single tower ({best_name})", best_score, "", ""],
                                ["the prior alone", evaluation.prior, "", ""]]
    classes = ["key", "", "", "key"]
    for tower, score in evaluation.per_tower.items():
        agreement = evaluation.view_agreement.get(tower)
        rows.append([f"tower {tower}", score, f"{evaluation.weights[tower]:g}",
                     "" if agreement is None else f"{agreement:.4f}"])
        classes.append("")
        for view, value in evaluation.per_view.items():
            if view.split("/", 1)[0] == tower:
                rows.append([f"view {view.split('/', 1)[1]}", value, "", ""])
                classes.append("view")
    table = _table(["", "mean cosine", "weight", "views agree (cosine)"], rows, classes)
    names = list(evaluation.per_view)

    def draw(figure) -> None:
        axes = figure.subplots()
        values = [evaluation.per_view[n] for n in names]
        axes.barh(range(len(names)), values, color=["#4878a8" if "/" in n else "#888" for n in names])
        axes.set_yticks(range(len(names)), names)
        axes.invert_yaxis()
        axes.axvline(evaluation.prior, color="#c44", linestyle="--", label=f"prior alone {evaluation.prior:.4f}")
        axes.axvline(evaluation.ensemble, color="#2a2", label=f"ensemble {evaluation.ensemble:.4f}")
        low = min([*values, evaluation.prior, evaluation.ensemble])
        axes.set_xlim(max(0.0, low - 0.05), max([*values, evaluation.ensemble]) + 0.02)
        axes.set_xlabel("mean cosine")
        axes.legend(loc="best", fontsize=8)

    chart = Chart("scores.png", "Every tower x TTA view, against the prior alone and the ensemble.",
                  _png(draw, (9, 1.2 + 0.35 * len(names))))
    return Section("Towers and views", table, [chart])


def _per_image_section(scores: Scores) -> Section:
    better = int((scores.ensemble > scores.prior).sum())
    n = len(scores.ensemble)
    rows = [[name, float(v.mean()), float(np.median(v)), float(v.min()), float(v.max())]
            for name, v in (("ensemble", scores.ensemble), ("the prior alone", scores.prior))]
    body = _table(["", "mean", "median", "min", "max"], rows) + \
        f"<p>The ensemble beats the prior on {better} of {n} images.</p>"

    def draw(figure) -> None:
        left, right = figure.subplots(1, 2)
        low = float(min(scores.prior.min(), scores.ensemble.min()))
        high = float(max(scores.prior.max(), scores.ensemble.max()))
        bins = np.linspace(low - 0.01, high + 0.01, 30)
        left.hist(scores.prior, bins=bins, alpha=0.6, color="#c44", label="prior alone")
        left.hist(scores.ensemble, bins=bins, alpha=0.6, color="#2a2", label="ensemble")
        left.set_xlabel("cosine per image")
        left.set_ylabel("images")
        left.legend()
        right.scatter(scores.prior, scores.ensemble, s=12, color="#4878a8")
        right.plot([low, high], [low, high], color="#999", linestyle="--", linewidth=1)
        right.set_xlabel("prior alone")
        right.set_ylabel("ensemble")
        right.set_title("each image (above the line: the ensemble helps)", fontsize=10)

    chart = Chart("per_image.png", "The per-image cosine of the ensemble against the prior alone.",
                  _png(draw, (10, 3.6)))
    return Section("Per image", body, [chart])


def _towers_section(scores: Scores) -> Section | None:
    names = list(scores.towers)
    if len(names) < 2:
        return None
    matrix = np.corrcoef(np.stack([scores.towers[n] for n in names]))
    matrix = np.nan_to_num(matrix, nan=0.0)  # a tower scoring every image alike (a prior) correlates with nothing
    rows = [[name, *(float(v) for v in matrix[i])] for i, name in enumerate(names)]
    body = _table(["", *names], rows) + ("<p>The correlation of the towers' per-image scores: towers that fail on "
                                         "the same images (near 1) add little to each other.</p>")

    def draw(figure) -> None:
        axes = figure.subplots()
        image = axes.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axes.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(names)):
                axes.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=9)
        figure.colorbar(image, ax=axes, shrink=0.8)

    side = 2.5 + 0.7 * len(names)
    chart = Chart("towers.png", "Correlation of the towers' per-image scores.", _png(draw, (side + 1, side)))
    return Section("How alike the towers are", body, [chart])


def _tuning_section(tuning: TuningReport) -> Section:
    names = list(tuning.oof)
    folds = list(tuning.per_fold)
    rows: list[list[object]] = [[f"fold {f}", *(tuning.per_fold[f][n] for n in names)] for f in folds]
    rows.append(["all folds (out of fold)", *(tuning.oof[n] for n in names)])
    body = (f"<p>{_text(tuning.mode)} tuning, {tuning.parameters} weights, {tuning.n_folds} folds of "
            f"{tuning.n_images} images; each fold scored by weights fit on the others. Tuning "
            f"{_text(tuning.verdict)} out of fold; fit on all rows: {tuning.fit_all_score:.4f}.</p>"
            + _table(["", *(n.replace("_", " ") for n in names)], rows, [""] * len(folds) + ["key"])
            + _table(["tower", "tuned weight"], [[t, float(w)] for t, w in tuning.weights.items()]))

    def draw(figure) -> None:
        axes = figure.subplots()
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            axes.bar(np.arange(len(folds)) + k * width, [tuning.per_fold[f][name] for f in folds], width,
                     label=name.replace("_", " "))
        axes.set_xticks(np.arange(len(folds)) + 0.4 - width / 2, [f"fold {f}" for f in folds])
        low = min(min(v.values()) for v in tuning.per_fold.values())
        axes.set_ylim(max(0.0, low - 0.05), None)
        axes.set_ylabel("mean cosine on the held-out fold")
        axes.legend(fontsize=8)

    chart = Chart("tuning.png", "Out of fold, per fold: tuned weights against equal, the manifest's and the best "
                                "single tower (chosen on the training folds).", _png(draw, (9, 3.6)))
    return Section("Tuning, out of fold", body, [chart])


def _thumbnail(path: Path) -> bytes | None:
    """A small PNG of an image, or None when it cannot be read (a report is never stopped by one file)."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            out = io.BytesIO()
            image.save(out, format="PNG")
            return out.getvalue()
    except Exception:  # noqa: BLE001 - an unreadable image shows no thumbnail; its row stays
        return None


def _worst_section(run: PredictionRun, scores: Scores, prompts: dict[str, str], paths: dict[str, Path]
                   ) -> tuple[Section, dict[str, bytes]]:
    order = np.argsort(scores.ensemble, kind="stable")[:WORST]
    captions = {tower: next(iter(views.values())) for tower, views in run.texts.items() if views}
    files: dict[str, bytes] = {}
    header = ["image", "id", "ensemble", "prior", "best tower", "prompt", *(f"{t} reads" for t in captions)]
    rows = []
    for index in order:
        image_id = run.ids[index]
        thumb = _thumbnail(paths[image_id]) if image_id in paths else None
        cell = ""
        if thumb is not None:
            files[f"worst_{index}.png"] = thumb
            cell = f"<img class=\"thumb\" src=\"{FILE_REF}worst_{index}.png\" alt=\"{_text(image_id)}\">"
        best = max(scores.towers, key=lambda t: scores.towers[t][index])
        rows.append([cell, _text(image_id), f"{scores.ensemble[index]:.4f}", f"{scores.prior[index]:.4f}",
                     f"{_text(best)} {scores.towers[best][index]:.4f}", _text(prompts.get(image_id, "")),
                     *(_text(texts[index]) for texts in captions.values())])
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class=\"prompt\">{v}</td>" if k == 5 else f"<td>{v}</td>"
                                    for k, v in enumerate(row)) + "</tr>" for row in rows)
    text = f"<p>The {len(rows)} images the ensemble scores lowest.</p><table><thead><tr>{head}</tr></thead>" \
           f"<tbody>{body}</tbody></table>"
    return Section("The worst images", text), files
