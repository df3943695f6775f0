"""Errors a user can act on.

Every error memprune raises on bad input is a :class:`MemPruneError`; its message names the bad
value and the fix. The CLI prints the message on one line and exits with status 2.
"""

from __future__ import annotations


class MemPruneError(Exception):
    """Base class of all memprune errors."""


class ConfigError(MemPruneError, ValueError):
    """An argument or option has a bad value."""


class DataError(MemPruneError, ValueError):
    """A data set cannot be built or read."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A data set's files are not where they should be."""


class EncoderError(MemPruneError, ValueError):
    """An encoder cannot be created."""


class CheckpointError(EncoderError):
    """A checkpoint cannot be read or does not fit the encoder."""


class CheckpointWarning(UserWarning):
    """A checkpoint was loaded with parts left out (training-only heads, or ``strict=False``)."""


class DataWarning(UserWarning):
    """Part of a data set is left out (files of an image folder that are not images)."""


class OutputError(MemPruneError, OSError):
    """An output cannot be written (a full disk, a file size limit, a read-only folder)."""


class SiteError(MemPruneError, ValueError):
    """Unit or layer sites cannot be found or captured."""


def first_line(err: BaseException, n: int = 120) -> str:
    """The first line of an exception's message, at most ``n`` characters (for messages that
    quote a library's error)."""
    return (str(err).splitlines() or [""])[0][:n]
