"""The submission file: `imgId_eId,val`, 384 rows per image, image-major, written atomically.

Values are written as the shortest decimal that round-trips to the same float32 (as Kaggle's own
sample_submission.csv is), so reading the file back gives exactly the predicted vectors.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import OutputError
from ..core.fileio import atomic_open, check_writable_file

HEADER = "imgId_eId,val"
ROWS_PER_CHUNK = 64  # images formatted per write: about 5 MB of strings at a time, whatever the image count
MAX_VALUE_CHARS = 15  # the longest shortest-repr of a unit float32, e.g. -1.2345678e-05


def submission_row_ids(ids: Sequence[str], embedding_dim: int = 384) -> list[str]:
    """The `imgId_eId` column: for each image in order, `{id}_0 .. {id}_{D-1}`."""
    return [f"{image_id}_{e}" for image_id in ids for e in range(embedding_dim)]


def _check(ids: Sequence[str], embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
        raise ValueError(f"embeddings shape {embeddings.shape} does not match {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise ValueError("image ids are not unique")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or inf; refusing to write a submission Kaggle would score as 0")
    return embeddings


def submission_frame(ids: Sequence[str], embeddings: np.ndarray) -> pd.DataFrame:
    """The submission as a DataFrame (columns imgId_eId, val) in file order."""
    embeddings = _check(ids, embeddings)
    return pd.DataFrame({"imgId_eId": submission_row_ids(ids, embeddings.shape[1]), "val": embeddings.reshape(-1)})


def estimated_csv_bytes(ids: Sequence[str], embedding_dim: int = 384) -> int:
    """An upper bound on the CSV's size: per row the id, `_{e},`, the longest value and a newline."""
    suffix = len(f"_{embedding_dim - 1},")
    per_image = sum(len(str(i).encode("utf-8")) for i in ids)
    return len(HEADER) + 1 + embedding_dim * per_image + len(ids) * embedding_dim * (suffix + MAX_VALUE_CHARS + 1)


def check_output_path(out_csv: str | Path, ids: Sequence[str], embedding_dim: int = 384) -> Path:
    """Before any compute: `out_csv` must be a file path in a writable folder with room for the CSV.

    Raises OutputError naming the path and the fix; creates nothing (a missing folder is made at the write).
    """
    path, folder = Path(out_csv), check_writable_file(out_csv)
    needed, free = estimated_csv_bytes(ids, embedding_dim), shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(f"cannot write {path}: {folder} has {free / 1e6:.1f} MB free and the submission "
                          f"needs up to {needed / 1e6:.1f} MB; free some space or choose another folder")
    return path


def write_submission(ids: Sequence[str], embeddings: np.ndarray, out_csv: str | Path) -> Path:
    """Write the CSV (UTF-8; Kaggle's hex ids give the same bytes as ASCII) to a temporary file beside `out_csv`,
    then rename it into place: never a half file, and an old file survives a failed write."""
    embeddings = _check(ids, embeddings)
    out_csv = Path(out_csv)
    suffixes = [f"_{e}," for e in range(embeddings.shape[1])]
    try:
        with atomic_open(out_csv, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(HEADER + "\n")
            for start in range(0, len(ids), ROWS_PER_CHUNK):
                values = embeddings[start:start + ROWS_PER_CHUNK].astype(str)  # shortest float32 round-trip
                lines = []
                for image_id, row in zip(ids[start:start + ROWS_PER_CHUNK], values, strict=True):
                    lines.extend(f"{image_id}{suffix}{value}" for suffix, value in zip(suffixes, row, strict=True))
                handle.write("\n".join(lines) + "\n")
    except OSError as err:
        kept = "the old file is unchanged" if out_csv.is_file() else "no file was left behind"
        raise OutputError(f"cannot write {out_csv}: {err.strerror or err}; {kept}") from err
    return out_csv


@dataclass
class FormatCheck:
    """The result of comparing a submission file with the competition's sample_submission.csv."""

    ok: bool
    problems: list[str] = field(default_factory=list)


def read_submission(path: str | Path) -> pd.DataFrame:
    """Read a submission CSV as Kaggle would (ids as strings, values as float)."""
    return pd.read_csv(path, dtype={"imgId_eId": str}, keep_default_na=False)


def check_format(submission_csv: str | Path, sample_csv: str | Path) -> FormatCheck:
    """Same header, same ids in the same order, same row count, finite values, as the sample submission."""
    problems = []
    with open(submission_csv, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\r\n")
    with open(sample_csv, encoding="utf-8") as handle:
        expected_header = handle.readline().rstrip("\r\n")
    if header != expected_header:
        problems.append(f"header is {header!r}, expected {expected_header!r}")
    ours, theirs = read_submission(submission_csv), read_submission(sample_csv)
    if len(ours) != len(theirs):
        problems.append(f"{len(ours)} rows, expected {len(theirs)}")
    if list(ours.columns) == ["imgId_eId", "val"]:
        n = min(len(ours), len(theirs))
        mismatch = np.flatnonzero(ours["imgId_eId"].to_numpy()[:n] != theirs["imgId_eId"].to_numpy()[:n])
        if len(mismatch):
            i = int(mismatch[0])
            problems.append(f"{len(mismatch)} row id(s) differ from the sample; first at row {i + 1}: "
                            f"{ours['imgId_eId'].iloc[i]!r} vs {theirs['imgId_eId'].iloc[i]!r}")
        values = pd.to_numeric(ours["val"], errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            problems.append(f"{int((~np.isfinite(values)).sum())} value(s) are empty, NaN or inf")
    return FormatCheck(ok=not problems, problems=problems)


def write_captions(ids: Sequence[str], texts: Mapping[str, Mapping[str, Sequence[str]]], out_csv: str | Path) -> Path:
    """What each caption tower read in each image: `imgId,tower,view,caption`, one row per image, tower and view,
    in submission order; written whole or not at all."""
    import pandas as pd

    rows = [(image_id, tower, view, captions[i]) for tower, views in texts.items()
            for view, captions in views.items() for i, image_id in enumerate(ids)]
    rows.sort(key=lambda row: row[0])  # ids first (stable: towers, then views, in manifest order)
    frame = pd.DataFrame(rows, columns=["imgId", "tower", "view", "caption"])
    with atomic_open(Path(out_csv), "w", encoding="utf-8", newline="\n") as handle:
        frame.to_csv(handle, index=False)
    return Path(out_csv)

