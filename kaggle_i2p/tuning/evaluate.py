"""Validation: score each tower, each TTA view and the ensemble on a labelled split, and tune the weights.

Targets are the prompts embedded with all-MiniLM-L6-v2 (or a `.npy` aligned to the sorted ids). Tuning is judged
out of fold (K-fold, or the `fold` column of the prompts file, e.g. grouped folds from build_dataset), against equal
weights, the manifest's weights and the best single tower chosen on the training folds, before it is fit on all rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.ensemble import VIEWS_DISAGREE, l2_normalize, mean_cosine, unusable_rows, view_agreement
from ..core.errors import I2PError, InputFileError
from ..core.fileio import atomic_open, first_undecodable, open_npy
from ..inference.predict import PredictionRun
from ..manifest import Manifest, edit_manifest, rebase_manifest_paths
from ..manifest.write import as_written
from .folds import kfold_numbers
from .tune import apply_weights, tune_dim_weights, tune_weights


class TargetError(I2PError, ValueError):
    """Targets that do not line up with the images."""


def read_prompts(prompts_csv: str | Path) -> pd.DataFrame:
    """A prompts file: columns imgId, prompt (Kaggle's prompts.csv layout), optionally fold; CSV, or the parquet
    index that build_dataset.sh writes."""
    if not Path(prompts_csv).is_file():
        raise TargetError(f"prompts file not found: {prompts_csv}")
    try:
        if str(prompts_csv).endswith(".parquet"):
            frame = pd.read_parquet(prompts_csv).astype({"imgId": str})
        else:
            frame = pd.read_csv(prompts_csv, dtype={"imgId": str}, keep_default_na=False)
    except ImportError as err:
        raise TargetError(f"{prompts_csv}: reading parquet needs pyarrow: pip install pyarrow "
                          f"(or kaggle_i2p[train]) ({err})") from err
    except UnicodeDecodeError:
        raise TargetError(f"{prompts_csv} {first_undecodable(prompts_csv)}; save it as UTF-8") from None
    except (ValueError, OSError) as err:
        raise TargetError(f"{prompts_csv}: cannot read it as a prompts table: {err}") from err
    missing = {"imgId", "prompt"} - set(frame.columns)
    if missing:
        raise TargetError(f"{prompts_csv}: needs columns imgId and prompt (missing {', '.join(sorted(missing))})")
    if frame["imgId"].duplicated().any():
        raise TargetError(f"{prompts_csv}: imgId {frame['imgId'][frame['imgId'].duplicated()].iloc[0]!r} repeats")
    return frame.set_index("imgId")


def load_targets(ids: list[str], prompts_csv: str | Path | None = None, targets_npy: str | Path | None = None,
                 text_model_path: str | Path | None = None, embedding_dim: int | None = None) -> np.ndarray:
    """(N, D) unit targets in `ids` order: embedded prompts, or a .npy already aligned to the sorted ids. Checked
    before any compute: the width (`embedding_dim`, the towers'), and every value finite with a non-zero row."""
    if (prompts_csv is None) == (targets_npy is None):
        raise TargetError("give exactly one of --prompts CSV or --targets NPY")
    if targets_npy is not None:
        if not Path(targets_npy).is_file():
            raise TargetError(f"targets file not found: {targets_npy}")
        width = f", {embedding_dim})" if embedding_dim else ", D)"
        try:
            targets = np.asarray(open_npy(targets_npy, "targets", ndim=2, rows=len(ids), width=embedding_dim),
                                 dtype=np.float64)
        except InputFileError as err:
            raise TargetError(f"{err}; the targets must be ({len(ids)}{width} aligned to the {len(ids)} sorted "
                              "image ids") from err
        bad = ~np.isfinite(targets).all(axis=1) | ~(np.abs(targets) > 0).any(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            named = ", ".join(f"{r} ({ids[r]})" for r in rows[:5])
            raise TargetError(f"{targets_npy}: {len(rows)} row(s) are NaN, infinite or all zeros, e.g. rows {named}; "
                              "every image needs a real target")
        return l2_normalize(targets).astype(np.float32)
    prompts = read_prompts(prompts_csv)
    absent = [i for i in ids if i not in prompts.index]
    if absent:
        raise TargetError(f"{prompts_csv}: no prompt for {len(absent)} image(s), e.g. {', '.join(absent[:5])}")
    from ..models.text import embed_prompts

    return embed_prompts(prompts.loc[ids, "prompt"].tolist(), model_path=text_model_path)


CONSTANT_VIEW = "constant"  # how a tower without views (a prior) is named among the views: `prior/constant`


def view_predictions(run: PredictionRun, fallback: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Each tower x view as a normalised (N, D) prediction named `tower/view` (unreadable rows = fallback; a tower
    without views is one prediction, `tower/constant`), and the view -> tower grouping."""
    preds, groups = {}, {}
    for tower, output in run.tower_embeddings.items():
        views = run.view_outputs.get(tower) or {CONSTANT_VIEW: output}
        for view, raw in views.items():
            out = l2_normalize(np.nan_to_num(raw, nan=0.0))
            out[unusable_rows(raw)] = fallback
            preds[f"{tower}/{view}"] = out
            groups[f"{tower}/{view}"] = tower
    return preds, groups


@dataclass
class EvaluationReport:
    """Mean cosine of every part of the ensemble on a labelled set; `to_json()` is the `--json` output."""

    n_images: int
    ensemble: float
    equal_weights: float
    best_single: dict[str, float]  # {tower: score}
    per_tower: dict[str, float]
    per_view: dict[str, float]
    weights: dict[str, float]
    prior: float = 0.0  # the fallback (prior) vector alone for every image: the floor every tower must beat
    view_agreement: dict[str, float] = field(default_factory=dict)  # per tower: mean cosine between its views
    warnings: list[str] = field(default_factory=list)  # where these numbers cannot be trusted as they are

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def __str__(self) -> str:
        (best_name, best_score), = self.best_single.items()
        lines = [f"evaluation on {self.n_images} images (mean cosine):",
                 f"  ensemble (manifest weights)  {self.ensemble:.4f}",
                 f"  equal weights                {self.equal_weights:.4f}",
                 f"  best single tower            {best_score:.4f}  ({best_name})",
                 f"  the prior alone              {self.prior:.4f}"]
        for tower, score in self.per_tower.items():
            lines.append(f"  tower {tower:<22} {score:.4f}  weight {self.weights[tower]:g}")
            lines += [f"    view {v.split('/', 1)[1]:<19} {s:.4f}" for v, s in self.per_view.items()
                      if v.split("/", 1)[0] == tower]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def evaluate_run(run: PredictionRun, manifest: Manifest, targets: np.ndarray) -> EvaluationReport:
    """Scores of a finished run (computed with include_zero_weight=True) against aligned targets."""
    per_tower = {name: mean_cosine(out, targets)[0] for name, out in run.tower_embeddings.items()}
    views, _ = view_predictions(run, manifest.fallback)
    best = max(per_tower, key=per_tower.get)
    ensemble = mean_cosine(run.embeddings, targets)[0]
    prior = mean_cosine(np.tile(manifest.fallback, (len(run.ids), 1)), targets)[0]
    agreement = {tower: value for tower, outputs in run.view_outputs.items() if tower in per_tower
                 if (value := view_agreement(list(outputs.values()))) is not None}
    return EvaluationReport(
        n_images=len(run.ids), ensemble=ensemble,
        equal_weights=mean_cosine(apply_weights(run.tower_embeddings, dict.fromkeys(per_tower, 1.0)), targets)[0],
        best_single={best: per_tower[best]}, per_tower=per_tower,
        per_view={name: mean_cosine(pred, targets)[0] for name, pred in views.items()},
        weights={t.name: t.weight for t in manifest.towers if t.name in per_tower}, prior=prior,
        view_agreement=agreement, warnings=score_warnings(ensemble, prior, agreement),
    )


def score_warnings(ensemble: float, prior: float, agreement: dict[str, float]) -> list[str]:
    """Where a run's numbers cannot be trusted: an ensemble below the prior vector alone (a tower served other than
    it was trained, or weighted too high), and a tower whose views disagree (a resolution or flip it was not trained
    for, or a preprocessing other than its own)."""
    out = []
    if ensemble < prior:
        out.append(f"the ensemble scores {ensemble:.4f}, below the prior vector alone ({prior:.4f}): a tower serves "
                   "something other than what it was trained for (prove each with `inspect --expect`), or weighs "
                   "too much")
    out += [f"tower {tower!r}: its views agree at a mean cosine of only {value:.3f} (TTA views of a tower served as "
            f"trained agree at ~0.95): a resolution, flip or preprocessing it was not trained for"
            for tower, value in agreement.items() if value < VIEWS_DISAGREE]
    return out


def fold_numbers(ids: list[str], n_folds: int, prompts_csv: str | Path | None = None, seed: int = 0) -> np.ndarray:
    """A fold number per image: the prompts file's `fold` column when it has one, else a seeded K-fold split."""
    if prompts_csv is not None:
        prompts = read_prompts(prompts_csv)
        if "fold" in prompts.columns:
            return _fold_column(prompts, ids, prompts_csv)
    if n_folds < 2 or n_folds > len(ids):
        raise TargetError(f"--folds {n_folds} must be between 2 and the number of images ({len(ids)})")
    return kfold_numbers(len(ids), n_folds, seed)


def _fold_column(prompts: pd.DataFrame, ids: list[str], prompts_csv: str | Path) -> np.ndarray:
    """The `fold` column for `ids`: whole numbers, at least two folds (one held out, one to fit on)."""
    absent = [i for i in ids if i not in prompts.index]
    if absent:
        raise TargetError(f"{prompts_csv}: no row for {len(absent)} image(s), e.g. {', '.join(absent[:5])}")
    raw = prompts.loc[ids, "fold"]
    numbers = pd.to_numeric(raw, errors="coerce")
    bad = numbers.isna() | (numbers != numbers.round())
    if bad.any():
        named = ", ".join(f"{i} ({raw[i]!r})" for i in list(raw.index[bad.to_numpy()])[:5])
        raise TargetError(f"{prompts_csv}: the fold column must hold whole numbers; {int(bad.sum())} row(s) do not, "
                          f"e.g. {named}")
    folds = numbers.astype(int).to_numpy()
    if len(set(folds.tolist())) < 2:
        raise TargetError(f"{prompts_csv}: the fold column holds one fold ({folds[0]}) for these images; tuning "
                          "judges out of fold and needs at least 2 (drop the column to split K-fold with --folds)")
    return folds


@dataclass
class TuningReport:
    """Out-of-fold scores of tuned vs reference weightings, and the weights fit on all rows."""

    n_images: int
    n_folds: int
    mode: str  # per_tower | per_view | per_dim
    oof: dict[str, float]  # tuned, equal_weights, manifest_weights, best_single_tower
    weights: dict[str, float]
    view_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    fit_all_score: float = 0.0
    parameters: int = 0  # the weights the tuning fits
    warnings: list[str] = field(default_factory=list)
    per_fold: dict[str, dict[str, float]] = field(default_factory=dict)  # fold -> the oof scores on its rows alone

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @property
    def verdict(self) -> str:
        """Whether the tuned weights beat equal weights out of fold, said only as far as the images can show it."""
        if self.oof["tuned"] < self.oof["equal_weights"]:
            return "does NOT beat equal weights"
        return "beats equal weights here, which these few images cannot show (see the warning)" if self.warnings \
            else "generalises"

    def __str__(self) -> str:
        lines = [f"tuning ({self.mode}) on {self.n_images} images, {self.n_folds}-fold out-of-fold mean cosine:"]
        lines += [f"  {name:<20} {score:.4f}" for name, score in self.oof.items()]
        lines.append(f"  tuning {self.verdict} out of fold; fit on all rows: {self.fit_all_score:.4f}")
        lines += [f"  weight {name:<18} {w:.4f}" for name, w in self.weights.items()]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def tune_run(run: PredictionRun, manifest: Manifest, targets: np.ndarray, folds: np.ndarray, *,
             per_view: bool = False, per_dim: bool = False, seed: int = 0) -> tuple[TuningReport, dict]:
    """Cross-validate the tuning, then fit on all rows; returns the report and the raw fitted weights."""
    if per_view and per_dim:
        raise ValueError("choose --per-view or --per-dim, not both")
    if per_view:
        preds, groups = view_predictions(run, manifest.fallback)
    else:
        preds, groups = dict(run.tower_embeddings), None
    towers = run.tower_embeddings
    manifest_weights = {t.name: t.weight for t in manifest.towers if t.name in towers}
    def tune(train_preds: dict[str, np.ndarray], train_targets: np.ndarray) -> dict:
        if per_dim:
            return tune_dim_weights(train_preds, train_targets, seed=seed)
        return tune_weights(train_preds, train_targets, groups=groups, seed=seed)

    oof = {name: np.zeros_like(targets)
           for name in ("tuned", "equal_weights", "manifest_weights", "best_single_tower")}
    for fold in np.unique(folds):
        train, held = folds != fold, folds == fold
        fitted = tune({k: v[train] for k, v in preds.items()}, targets[train])
        oof["tuned"][held] = apply_weights({k: v[held] for k, v in preds.items()}, fitted, groups)
        oof["equal_weights"][held] = apply_weights({k: v[held] for k, v in towers.items()}, dict.fromkeys(towers, 1))
        if sum(manifest_weights.values()) > 0:
            oof["manifest_weights"][held] = apply_weights({k: v[held] for k, v in towers.items()}, manifest_weights)
        best = max(towers, key=lambda t: mean_cosine(towers[t][train], targets[train])[0])
        oof["best_single_tower"][held] = towers[best][held]  # chosen on the training folds only
    scores = {name: mean_cosine(pred, targets)[0] for name, pred in oof.items()}
    per_fold = {str(fold): {name: mean_cosine(pred[folds == fold], targets[folds == fold])[0]
                            for name, pred in oof.items()} for fold in np.unique(folds)}

    fitted = tune(preds, targets)
    fit_score = mean_cosine(apply_weights(preds, fitted, groups), targets)[0]
    if per_view:
        tower_weights = {t: sum(w for k, w in fitted.items() if groups[k] == t) for t in towers}
        view_weights = {t: {k.split("/", 1)[1]: w / tower_weights[t] if tower_weights[t] > 0 else 1.0
                            for k, w in fitted.items() if groups[k] == t} for t in towers}
    elif per_dim:
        tower_weights, view_weights = {t: float(np.mean(fitted[t])) for t in towers}, {}
    else:
        tower_weights, view_weights = dict(fitted), {}
    parameters = sum(int(np.size(v)) for v in fitted.values())
    smallest = min(int((folds != fold).sum()) for fold in np.unique(folds))  # training rows of the leanest fold
    warnings = [f"the {report_mode(per_view, per_dim)} tuning fits {parameters} weights on as few as {smallest} "
                "images per fold: with fewer images than weights its out-of-fold score is chance, not a sign it "
                "generalises; label more images, or tune fewer weights (per tower)"] if parameters > smallest else []
    report = TuningReport(n_images=len(run.ids), n_folds=len(np.unique(folds)),
                          mode=report_mode(per_view, per_dim), oof=scores, weights=tower_weights,
                          view_weights=view_weights, fit_all_score=fit_score, parameters=parameters,
                          warnings=warnings, per_fold=per_fold)
    return report, fitted


def report_mode(per_view: bool, per_dim: bool) -> str:
    return "per_view" if per_view else "per_dim" if per_dim else "per_tower"


def write_tuned_manifest(source: str | Path, out: str | Path, report: TuningReport, fitted: dict) -> Path:
    """Copy the manifest with the tuned weights (and view or per-dimension weights), every path rebased to the new
    folder and the source's comments and formatting kept; validated before it is written, then written atomically."""
    source, out = Path(source), Path(out)
    if out.is_dir():
        raise TargetError(f"--out {out} is a folder; give the tuned manifest's file path, e.g. {out / 'tuned.yaml'}")

    def tuned(data: Any) -> None:
        rebase_manifest_paths(data, source.resolve().parent, out.resolve().parent)
        for tower in data["towers"]:
            name = tower["name"]
            if name not in report.weights:
                continue
            tower["weight"] = round(float(report.weights[name]), 8)
            if report.view_weights and "image" in tower:  # a tower without views has no image section
                tower["image"]["view_weights"] = as_written(
                    {v: round(float(w), 8) for v, w in report.view_weights[name].items()})
            if report.mode == "per_dim":
                vector = np.asarray(fitted[name], dtype=np.float32)
                mean = float(vector.mean())
                path = out.with_name(f"{out.stem}.{name}.dim_weights.npy")
                with atomic_open(path, "wb") as handle:  # beside the manifest, before the manifest naming it is checked
                    np.save(handle, vector / mean if mean > 0 else np.ones_like(vector))
                tower["dim_weights"] = path.name

    edit_manifest(source, tuned, out)  # validated as read from where it is written, then written atomically
    return out
