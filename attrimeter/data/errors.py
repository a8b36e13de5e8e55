"""Errors and warnings about data set folders and annotation files (docs/architecture.md §7)."""

from __future__ import annotations

__all__ = ["DataFormatError", "UnknownAttributeWarning"]


class DataFormatError(ValueError):
    """A data set folder or annotation file does not follow the expected format; the message names the file."""


class UnknownAttributeWarning(UserWarning):
    """An attribute file holds codes other than 1 and 2; those entries were read as unknown (the message names them)."""
