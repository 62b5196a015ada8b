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
