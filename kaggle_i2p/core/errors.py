"""The one base of every user error: the CLI prints its message (naming the file or field and the fix) and exits 2."""

from __future__ import annotations


class I2PError(Exception):
    """A problem the user can fix (a path, an option, a file); never a bug in kaggle_i2p."""


class OptionError(I2PError, ValueError):
    """An option value that cannot work (a batch size below 1, an unknown device, a CUDA device without a GPU)."""


class OutputError(I2PError, OSError):
    """An output that cannot be written (a folder where a file goes, a read-only folder, a full disk)."""


class InputFileError(I2PError, ValueError):
    """A file we did not write that cannot be used: truncated, damaged, of the wrong shape, type or text encoding."""


class EntryFieldError(I2PError, ValueError):
    """A problem a tower's kind finds while building or running it that belongs to one field of its manifest entry
    (`field`), so the check names `tower 'x' (towers[i]).FIELD` like every other manifest problem."""

    field: str = "arch"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        if field is not None:
            self.field = field
