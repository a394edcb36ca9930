"""Errors raised while fetching, extracting and verifying the data.

Configuration mistakes (a bad ``data.*`` value) are plain ``ValueError``s raised before any data is
touched; everything here is about the data itself, and every message says what to do about it.
"""

from __future__ import annotations

from collections.abc import Sequence


class DataError(RuntimeError):
    """Base class: the dataset on disk (or on the network) is not usable as it is."""


class DownloadError(DataError):
    """A download failed; the message names the URL and the ``data.archive=PATH`` way around it."""


class ChecksumError(DataError):
    """An archive does not match its published size/checksum."""


class ArchiveError(DataError):
    """An archive is truncated, corrupt or not in the official layout."""


class UnsafeArchiveError(ArchiveError):
    """An archive holds members that would land outside the extraction folder."""

    def __init__(self, message: str, members: Sequence[str]) -> None:
        super().__init__(message)
        self.members = list(members)


class MissingArchiveError(DataError, FileNotFoundError):
    """``data.archive`` or ``data.root`` points at nothing."""


class LayoutError(DataError):
    """The extracted folder disagrees with the official layout or with its label CSV."""


class CorruptImagesError(DataError):
    """Some images cannot be decoded; ``paths`` lists every one of them."""

    def __init__(self, message: str, paths: Sequence[str]) -> None:
        super().__init__(message)
        self.paths = list(paths)
