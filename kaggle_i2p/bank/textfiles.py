"""Texts from the files people keep prompts in: .txt (one per line), .csv or .parquet (one column), read in batches
so that a 56M-row file never sits in one Python list."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import I2PError
from ..core.fileio import first_undecodable

READ_BATCH_ROWS = 65_536
DEFAULT_ENCODING = "utf-8"


class TextFileError(I2PError, ValueError):
    """A texts file that cannot be read: missing, of another type, or without the column asked for."""


def _clean(texts) -> list[str]:
    """Whitespace collapsed (a text is one line of the bank), blank texts dropped."""
    cleaned = (" ".join(str(t).split()) for t in texts)
    return [t for t in cleaned if t]


COMPRESSED = (".gz", ".bz2", ".xz", ".zip", ".zst", ".tar")  # pandas reads these: no byte offset to name in them


def _decode_error(path: Path, encoding: str) -> TextFileError:
    compressed = path.suffix.lower() in COMPRESSED
    where = (None if compressed else first_undecodable(path, encoding)) or (
        f"is not {encoding} text" + (" once decompressed" if compressed else ""))
    return TextFileError(f"{path} {where}; pass --encoding with the file's encoding (e.g. --encoding latin-1, "
                         "cp1252), or convert it to UTF-8")


def check_source(path: str | Path, column: str | None = None, encoding: str = DEFAULT_ENCODING) -> str | None:
    """Before any work: the file exists and (CSV/parquet) has the column; returns the column (None for .txt)."""
    path = Path(path)
    if not path.is_file():
        raise TextFileError(f"texts file not found: {path}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise TextFileError(f"--encoding {encoding!r} is not a text encoding Python knows (e.g. utf-8, latin-1, "
                            "cp1252)") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return None
    column = column or "prompt"
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            columns = pq.ParquetFile(path).schema_arrow.names
        else:  # anything else is read as CSV (compressed ones too)
            import pandas as pd

            columns = list(pd.read_csv(path, nrows=0, encoding=encoding).columns)
    except UnicodeDecodeError:
        raise _decode_error(path, encoding) from None
    except ImportError as err:
        raise TextFileError(f"{path}: reading parquet needs pyarrow (pip install pyarrow): {err}") from err
    except Exception as err:  # noqa: BLE001 - any parse failure is one message naming the file
        raise TextFileError(f"{path}: cannot read it as {'parquet' if suffix == '.parquet' else 'CSV'}: "
                            f"{type(err).__name__}: {err}") from err
    if column not in columns:
        raise TextFileError(f"{path}: no column {column!r} (columns: {', '.join(map(str, columns))}); pass --column")
    return column


def iter_text_batches(path: str | Path, column: str | None = None, batch_rows: int = READ_BATCH_ROWS,
                      encoding: str = DEFAULT_ENCODING) -> Iterator[list[str]]:
    """The file's non-blank texts in order, a batch at a time (a 56M-row file never sits in one list); bytes that
    are not `encoding` text are one TextFileError naming the file and the byte offset."""
    path = Path(path)
    try:
        yield from _text_batches(path, check_source(path, column, encoding), batch_rows, encoding)
    except UnicodeDecodeError:
        raise _decode_error(path, encoding) from None


def _text_batches(path: Path, column: str | None, batch_rows: int, encoding: str) -> Iterator[list[str]]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        batch = []
        with open(path, encoding=encoding) as handle:
            for line in handle:
                batch.append(line)
                if len(batch) == batch_rows:
                    yield _clean(batch)
                    batch = []
        yield _clean(batch)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=[column]):
            yield _clean(t for t in record_batch.column(0).to_pylist() if t is not None)
    else:
        import pandas as pd

        for frame in pd.read_csv(path, usecols=[column], dtype=str, keep_default_na=False, chunksize=batch_rows,
                                 encoding=encoding):
            yield _clean(frame[column])


def read_texts(path: str | Path, column: str | None = None, encoding: str = DEFAULT_ENCODING) -> list[str]:
    """Every non-blank text of a .txt, .csv or .parquet file (`column`, default `prompt`), for small files."""
    return [text for batch in iter_text_batches(path, column, encoding=encoding) for text in batch]
