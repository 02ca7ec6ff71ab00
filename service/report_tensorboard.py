"""TensorBoard event files for a run (``[logging] tensorboard``), written with tensorboard's
own writer (``EventFileWriter`` and its protos): no TensorFlow, no torch.

What a directory holds: one event file per start of the actors (the first, each resume, each
recovery), each beginning with a ``SessionLog(status=START)`` event at step
``start_step + 1`` and the job as a text summary (tag ``job``, the Text tab) at that step;
then every step's scalars (:func:`~shardstep.service.reporting.scalars`: ``train/loss``,
``train/grad_norm``, ``train/step_seconds``, ``lr/<group>``, ``eval/<metric>``) at the
record's step and wall time, and ``checkpoint/seconds`` at each committed checkpoint's step.

Resume and recovery: TensorBoard reads a directory's event files in the order of their
names and, on a START event at step T, drops every event it has read with a step >= T (its
``EventAccumulator`` purge; torch's ``SummaryWriter(purge_step=T)`` writes the same event).
So the steps after the checkpoint, trained again, replace the ones the earlier start wrote:
every step shows once, with the values of the LATEST start. The job text of each start is at
``start_step + 1`` for the same reason: a start from the same checkpoint replaces it, and the
Text tab shows the job as trained from each resume point on. (The TensorBoard server's reader,
``plugin_event_accumulator``, purges every kind of event; the legacy ``EventAccumulator``
purges its scalars but keeps the tensors, the text among them, of every start.)

Event file names begin with the second they were opened in, so a start waits (at most two
seconds) until its file's name sorts after every event file already in the directory. A file
named two seconds or more ahead of this machine's clock (another machine's clock ahead) is not
waited for: it then sorts after this start's file, is read after its purge, and its values of
the replayed steps show beside this start's.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any

from shardstep.service.reporting import Reporter, RunInfo, scalars

MISSING = "logging.tensorboard needs the tensorboard package: pip install 'shardstep[tensorboard]'"

# the name EventFileWriter gives a file: events.out.tfevents.<10-digit second>.<host>.<pid>.<n>
_EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d{10})\.")
# longest a start waits for its event file to sort after the newest one already there
_MAX_ORDER_WAIT = 2.0
# the writer's own background flush: a live TensorBoard sees the steps this late at most
_FLUSH_SECONDS = 10


def _tensorboard() -> Any:
    """tensorboard's writer and protos, imported when a reporter is made (the core runs without them)."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.plugins.text import metadata as text_metadata
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as error:
        raise ImportError(MISSING) from error
    return EventFileWriter, event_pb2, summary_pb2, (tensor_pb2, tensor_shape_pb2, types_pb2), text_metadata


def job_markdown(job: dict[str, Any]) -> str:
    """The job as pretty JSON in a fenced markdown code block (what the Text tab renders). The
    fence is longer than any run of backticks in the JSON, so no value can close it early."""
    text = json.dumps(job, indent=2, default=str)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}json\n{text}\n{fence}"


class TensorBoard(Reporter):
    """The run's numbers as TensorBoard event files in ``directory``."""

    name = "TensorBoard"

    def __init__(self, directory: str | os.PathLike):
        (self._writer_class, self._event_pb2, self._summary_pb2, self._tensor_protos,
         self._text_metadata) = _tensorboard()
        self.directory = os.fspath(directory)
        self._writer: Any = None
        self._groups: tuple[str, ...] = ()

    # -- the four calls

    def start(self, info: RunInfo) -> None:
        self._close()  # a recovery in this process: the previous start's file ends here
        self._groups = tuple(info.group_names)
        self._wait_for_a_later_name()
        self._writer = self._writer_class(self.directory, flush_secs=_FLUSH_SECONDS)
        first = info.start_step + 1
        now = time.time()
        # the restart: TensorBoard drops what earlier files hold at steps >= first
        self._add(self._event_pb2.Event(wall_time=now, step=first,
                                        session_log=self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)))
        self._add(self._event_pb2.Event(wall_time=now, step=first, summary=self._job_summary(info)))
        self._writer.flush()  # the purge reaches a live TensorBoard before the replayed steps do

    def step(self, record: dict[str, Any]) -> None:
        values = scalars(record, self._groups)
        if not values:  # a skipped step: nothing to plot
            return
        wall_time = record.get("time")
        if not isinstance(wall_time, (int, float)) or not math.isfinite(wall_time):
            wall_time = time.time()
        summary = self._summary_pb2.Summary(value=[self._summary_pb2.Summary.Value(tag=tag, simple_value=value)
                                                   for tag, value in values.items()])
        self._add(self._event_pb2.Event(wall_time=float(wall_time), step=int(record["step"]), summary=summary))

    def checkpoint(self, step: int, seconds: float) -> None:
        summary = self._summary_pb2.Summary(value=[self._summary_pb2.Summary.Value(tag="checkpoint/seconds",
                                                                                   simple_value=float(seconds))])
        self._add(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
        self._writer.flush()  # what a committed checkpoint covers is on disk too

    def finish(self, status: str) -> None:
        self._close()

    # -- the pieces

    def _add(self, event: Any) -> None:
        if self._writer is None:
            raise RuntimeError(f"the TensorBoard reporter of {self.directory} is not started")
        self._writer.add_event(event)

    def _close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.flush()  # flush() raises what the writer's thread met; close() would not
            writer.close()

    def _job_summary(self, info: RunInfo) -> Any:
        # the text plugin's own metadata (plugin_name "text") and a string tensor of shape [1],
        # as torch's add_text builds it; the tag is plain "job" (torch would add "/text_summary")
        metadata = self._text_metadata.create_summary_metadata(
            display_name="job", description=f"The job of run {info.name} ({info.run_id}), as trained from step "
                                             f"{info.start_step + 1} on")
        tensor_pb2, tensor_shape_pb2, types_pb2 = self._tensor_protos
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[job_markdown(info.job).encode("utf-8")],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto(
                                            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
        return self._summary_pb2.Summary(value=[self._summary_pb2.Summary.Value(tag="job", metadata=metadata,
                                                                                tensor=tensor)])

    def _wait_for_a_later_name(self) -> None:
        """TensorBoard orders a directory's event files by name, and the purge only works on
        events read before the START: the new file's name (its second first) must sort after
        every file there. Two starts in one second (a recovery, a quick resume) wait for the
        next second."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        seconds = [int(m.group(1)) for m in map(_EVENT_FILE.match, names) if m]
        if not seconds:
            return
        newest = max(seconds)
        deadline = time.time() + _MAX_ORDER_WAIT
        while int(time.time()) <= newest and time.time() < deadline:
            time.sleep(min(newest + 1 - time.time(), deadline - time.time()) + 0.001)
