"""Checkpoint format, store and resharding."""
