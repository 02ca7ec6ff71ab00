"""The two errors a checkpoint reader or writer raises for anything on disk."""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint could not be written, found or read. The message names the path."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is damaged or is not a checkpoint: bad magic, unknown version,
    truncation, checksum mismatch, a header that contradicts itself or the file."""
