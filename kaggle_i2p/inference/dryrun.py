"""Dry-run against the competition's sample: predict its images, check the CSV format, score it, check the targets.

The sample's sample_submission.csv holds the true embeddings of its prompts, so a dry-run both proves the file format
(same header, ids, order and count) and gives a real mean cosine. When the text model is installed it also checks
that embedding prompts.csv reproduces sample_submission.csv, i.e. that training targets are made the right way.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.ensemble import mean_cosine
from ..core.errors import I2PError
from ..core.fileio import check_writable_file
from ..core.resources import DATA_DIR, KAGGLE_SAMPLE_DIR, default_manifest
from ..manifest import Manifest, NetworkSpec, as_manifest, kind_of
from .options import RunOptions
from .predict import RunSummary, run_prediction
from .submission import check_format, read_submission, write_submission

EMBEDDING_TOLERANCE = 1e-6


def bundled_sample_dir() -> Path:
    """The copy of the competition's public sample (7 images + CSVs) shipped inside the package."""
    return DATA_DIR / "kaggle_sample"


def default_sample_dir() -> Path:
    """The competition data when attached on Kaggle, else the bundled copy."""
    return KAGGLE_SAMPLE_DIR if (KAGGLE_SAMPLE_DIR / "sample_submission.csv").is_file() else bundled_sample_dir()


def sample_targets(sample_csv: str | Path) -> tuple[list[str], np.ndarray]:
    """Image ids (file order) and the (N, D) target matrix of a sample_submission.csv."""
    frame = read_submission(sample_csv)
    row_ids = frame["imgId_eId"].str.rsplit("_", n=1)
    image_ids = list(dict.fromkeys(row_ids.str[0]))
    values = frame["val"].to_numpy(dtype=np.float32)
    return image_ids, values.reshape(len(image_ids), -1)


@dataclass
class DryRunReport:
    """Everything a dry-run found; `to_json()` is the `--json` output."""

    sample_dir: str
    manifest: str
    submission_csv: str
    n_images: int
    format_ok: bool
    format_problems: list[str]
    mean_cosine: float | None
    per_image: dict[str, float]
    fallback_mean_cosine: float  # the manifest's fallback (prior) vector alone, written for every image: a baseline
    fallback_per_image: dict[str, float]
    embedding_check_max_abs_diff: float | None
    embedding_check_ok: bool | None
    embedding_check_note: str
    summary: RunSummary | None = field(default=None, repr=False)

    @property
    def warnings(self) -> list[str]:
        """Where the score cannot be trusted as it is: below the prior vector alone."""
        if self.mean_cosine is not None and self.mean_cosine < self.fallback_mean_cosine:
            return [f"the ensemble scores {self.mean_cosine:.4f} on the sample, below the prior vector alone "
                    f"({self.fallback_mean_cosine:.4f}): a tower serves something other than what it was trained "
                    "for (prove each with `kaggle-i2p inspect CKPT --expect VECTORS`), or weighs too much"]
        return []

    def to_dict(self) -> dict:
        data = asdict(self)
        data["summary"] = str(self.summary) if self.summary else None
        data["warnings"] = self.warnings
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def __str__(self) -> str:
        lines = [f"dry-run on {self.sample_dir} with {self.manifest}"]
        lines.append(f"  format vs sample_submission.csv: {'OK' if self.format_ok else 'FAILED'}")
        lines.extend(f"    - {p}" for p in self.format_problems)
        for image_id, score in self.per_image.items():
            lines.append(f"  {image_id}  cosine {score:+.4f}   (prior alone {self.fallback_per_image[image_id]:+.4f})")
        if self.mean_cosine is not None:
            lines.append(f"  mean cosine over {self.n_images} images: {self.mean_cosine:.4f}")
        lines.append(f"  baseline, the fallback (prior) vector for every image: {self.fallback_mean_cosine:.4f}")
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.embedding_check_max_abs_diff is None:
            lines.append(f"  target check: skipped ({self.embedding_check_note})")
        else:
            verdict = "OK" if self.embedding_check_ok else "MISMATCH"
            lines.append(f"  target check: all-MiniLM-L6-v2(prompts.csv) vs sample_submission.csv max abs diff "
                         f"{self.embedding_check_max_abs_diff:.2e} ({verdict}, tolerance {EMBEDDING_TOLERANCE:g})")
        return "\n".join(lines)


def check_target_embeddings(sample_dir: Path, image_ids: list[str], targets: np.ndarray,
                            text_model_path: str | Path | None = None) -> tuple[float | None, str]:
    """Max abs difference between embedding prompts.csv and the sample targets, or None and why not."""
    prompts_csv = sample_dir / "prompts.csv"
    if not prompts_csv.is_file():
        return None, f"no prompts.csv in {sample_dir}"
    from ..models.text import TextModelUnavailable, embed_prompts

    prompts = pd.read_csv(prompts_csv, dtype={"imgId": str}).set_index("imgId")["prompt"]
    missing = [i for i in image_ids if i not in prompts.index]
    if missing:
        return None, f"prompts.csv lacks {len(missing)} sample id(s), e.g. {missing[0]}"
    try:
        embedded = embed_prompts([prompts[i] for i in image_ids], model_path=text_model_path)
    except TextModelUnavailable as err:
        return None, str(err)
    return float(np.abs(embedded - targets).max()), "all-MiniLM-L6-v2"


def dry_run(sample_dir: str | Path | None = None, manifest: str | Path | Manifest | None = None,
            options: RunOptions | None = None, *, out_csv: str | Path | None = None, check_embeddings: bool = True,
            text_model_path: str | Path | None = None, **values: Any) -> DryRunReport:
    """Predict the sample images, write and check the CSV against sample_submission.csv, and score it.

    `manifest` defaults to weights_manifest.yaml on Kaggle and the demo ensemble elsewhere (`demo` names it too).
    """
    options = RunOptions.of(options, **values)
    sample_dir = Path(sample_dir) if sample_dir else default_sample_dir()
    sample_csv = sample_dir / "sample_submission.csv"
    image_dir = sample_dir / "images"
    for needed in (sample_csv, image_dir):
        if not needed.exists():
            raise I2PError(f"{needed} not found: a sample dir holds images/ and sample_submission.csv "
                           "(the competition's layout)")
    if out_csv is not None:
        check_writable_file(out_csv)  # before the compute, like every output
    manifest = as_manifest(default_manifest() if manifest is None else manifest)
    run = run_prediction(image_dir, manifest, options)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(out_csv) if out_csv else Path(tmp) / "submission.csv"
        write_submission(run.ids, run.embeddings, csv_path)
        fmt = check_format(csv_path, sample_csv)
        written = read_submission(csv_path)

    image_ids, targets = sample_targets(sample_csv)
    baseline, baseline_rows = mean_cosine(np.tile(manifest.fallback, (len(image_ids), 1)), targets)
    mean, per_image = None, {}
    if fmt.ok:
        predicted = written["val"].to_numpy(dtype=np.float32).reshape(len(image_ids), -1)
        mean, per_row = mean_cosine(predicted, targets)
        per_image = {i: float(s) for i, s in zip(image_ids, per_row, strict=True)}

    diff, note = (None, "not requested")
    if check_embeddings:  # the text model given (or installed), and every one the manifest's towers embed with
        folders = list(dict.fromkeys([text_model_path, *(folder for spec in manifest.towers
                                                         if isinstance(spec, NetworkSpec)
                                                         for folder in kind_of(spec).text_models(spec))]))
        for folder in folders:
            found, why = check_target_embeddings(sample_dir, image_ids, targets, folder)
            if found is None:
                diff, note = None, why
                break
            diff = found if diff is None else max(diff, found)
            note = "all-MiniLM-L6-v2" + (f" ({len(folders)} folders: the manifest's towers' too)"
                                         if len(folders) > 1 else "")
    return DryRunReport(
        sample_dir=str(sample_dir), manifest=str(manifest.path), submission_csv=str(out_csv) if out_csv else "",
        n_images=len(run.ids), format_ok=fmt.ok, format_problems=fmt.problems, mean_cosine=mean,
        per_image=per_image, fallback_mean_cosine=baseline,
        fallback_per_image={i: float(s) for i, s in zip(image_ids, baseline_rows, strict=True)},
        embedding_check_max_abs_diff=diff,
        embedding_check_ok=None if diff is None else diff <= EMBEDDING_TOLERANCE, embedding_check_note=note,
        summary=run.summary,
    )
