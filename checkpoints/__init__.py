"""Checkpoints: a documented, pickle-free file format, sharded run checkpoints that load at
any shard count, retention and asynchronous saves.

Single files: :func:`dump` / :func:`load`. Run checkpoints: a :class:`CheckpointStore`
begins a step, every shard writes its slices with :func:`write_shard` (in parallel, from
its own process), the store commits; :func:`open_checkpoint` reads one back at any shard
count (``load_shard``) or consolidated (``export``); :func:`newest_intact` finds the newest
checkpoint that verifies, and :meth:`CheckpointStore.set_aside` moves a damaged one out of the
way. The format is specified in ``checkpoints/FORMAT.md``; the guide is
``docs/checkpoints.md``.
"""

from __future__ import annotations

from shardstep.checkpoints.async_save import AsyncSaver
from shardstep.checkpoints.errors import CheckpointError, CorruptCheckpointError
from shardstep.checkpoints.format import dump, load
from shardstep.checkpoints.layout import ParamSpec, ShardLayout, partition
from shardstep.checkpoints.run import (
    CheckpointStore,
    PendingCheckpoint,
    Retention,
    RunCheckpoint,
    best_step,
    committed_steps,
    latest_step,
    newest_intact,
    open_checkpoint,
    open_intact,
    open_newest_intact,
    write_shard,
)

__all__ = [
    "AsyncSaver",
    "CheckpointError",
    "CheckpointStore",
    "CorruptCheckpointError",
    "ParamSpec",
    "PendingCheckpoint",
    "Retention",
    "RunCheckpoint",
    "ShardLayout",
    "best_step",
    "committed_steps",
    "dump",
    "latest_step",
    "load",
    "newest_intact",
    "open_intact",
    "open_newest_intact",
    "open_checkpoint",
    "partition",
    "write_shard",
]
