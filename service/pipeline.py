"""The step pipeline: the calls of one optimizer step in flight on the actors.

One step is ``compute`` on every gradient worker (the global batch split by rank), then
``reduce`` on every shard (the workers' pieces of its slice, added in rank order), then
``apply`` (the rule on the shard's slices), or ``reduce_apply`` in one call when the
coordinator has nothing to decide between the two (``fused``). The pipeline submits a
whole evaluation before it waits once; ``apply`` is never waited for, since calls to one
actor run in order and the next evaluation's workers take the slices it returns. The next
step's computation goes out with the update (:meth:`StepPipeline.apply`'s ``following``),
so Ray starts it the moment the updates are done while the coordinator does the step's
bookkeeping.

Every future the pipeline holds belongs to the actors it was built for: after an actor is
lost the coordinator drops the pipeline and builds a new one for the new actors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class StepPipeline:
    """The futures of the current step on ``shards`` and ``workers`` (actor handles of
    ``backend``). ``fused``: reduce and apply are one call per shard."""

    def __init__(self, backend: Any, shards: Sequence[Any], workers: Sequence[Any], fused: bool):
        self.backend = backend
        self.shards = list(shards)
        self.workers = list(workers)
        self.fused = fused
        # fire-and-forget calls, whose errors surface at the next wait
        self.outstanding: list[Any] = []
        # futures of every shard's packed slices as of the last update (None: ask for them)
        self.param_refs: list[Any] | None = None
        # an evaluation submitted ahead: ((epoch, batch), (worker outputs, shard reports or None))
        self.ahead: tuple[tuple[int, int], tuple[list, list | None]] | None = None
        self.round_trips = 0
        # what the last evaluation's workers measured for the model's buffers, in rank order
        # (empty for a model without buffers)
        self.statistics: list[dict] = []

    # -- waiting -------------------------------------------------------------------------

    def wait(self, refs: Sequence[Any]) -> list:
        """The values of ``refs``, after every fire-and-forget call made since the last wait."""
        outstanding, self.outstanding = self.outstanding, []
        self.round_trips += 1
        values = self.backend.get(outstanding + list(refs))
        return values[len(outstanding):]

    def fire(self, refs: Sequence[Any]) -> None:
        self.outstanding.extend(refs)

    def on_shards(self, method: str, *args: Any, **kwargs: Any) -> list:
        """Call ``method`` on every shard: the futures, in shard order."""
        return [self.backend.call(shard, method, *args, **kwargs) for shard in self.shards]

    # -- the step ------------------------------------------------------------------------

    def current_params(self) -> list:
        if self.param_refs is None:
            self.param_refs = self.on_shards("get_params")
        return self.param_refs

    def _submit_compute(self, epoch: int, index: int) -> list:
        slices = self.current_params()
        returns = len(self.shards) + 1
        return [self.backend.call(w, "compute", epoch, index, *slices, num_returns=returns) for w in self.workers]

    def _submit_reduce(self, outputs: list, norm: bool, hyperparameters: list[dict] | None) -> list:
        """Every shard's ``reduce`` of the workers' pieces (``reduce_apply`` with
        ``hyperparameters`` when fused): the shards' reports."""
        pieces = [[out[1 + s] for out in outputs] for s in range(len(self.shards))]
        if not self.fused:
            return [self.backend.call(shard, "reduce", *pieces[s], norm=norm) for s, shard in enumerate(self.shards)]
        pairs = [self.backend.call(shard, "reduce_apply", hyperparameters, *pieces[s], num_returns=2)
                 for s, shard in enumerate(self.shards)]
        self.param_refs = [pair[1] for pair in pairs]
        return [pair[0] for pair in pairs]

    def evaluation(self, epoch: int, index: int, norm: bool, hyperparameters: list[dict],
                   also: Sequence[Any] = ()) -> tuple[float, list[dict], list]:
        """One closure evaluation of batch ``index`` of ``epoch``: gather, compute, reduce
        (and apply, when fused), then one wait, which also takes the futures ``also``.
        Returns the global loss (the workers' parts added in rank order), the shards'
        reports and the values of ``also``."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == (epoch, index):
            outputs, reports = ahead[1]
        else:
            outputs, reports = self._submit_compute(epoch, index), None
        if reports is None:
            reports = self._submit_reduce(outputs, norm, hyperparameters)
        values = self.wait([out[0] for out in outputs] + reports + list(also))
        losses = values[:len(outputs)]
        shard_reports = values[len(outputs):len(outputs) + len(self.shards)]
        loss = 0.0
        self.statistics = []
        for part in losses:
            if isinstance(part, tuple):  # (loss, buffer statistics): see GradientWorker.compute
                part, statistics = part
                self.statistics.append(statistics)
            loss += part
        return loss, shard_reports, values[len(outputs) + len(self.shards):]

    def apply(self, hyperparameters: list[dict], clip_scale: float | None,
              following: tuple[int, int] | None, norm: bool) -> None:
        """The update with ``hyperparameters`` (already applied when fused), not waited
        for; then, when ``following`` names the next (epoch, batch), its computation (and,
        not fused, its reduce) goes out at once. Fused, the next reduce_apply waits for the
        next step's hyperparameters."""
        if not self.fused:
            self.param_refs = self.on_shards("apply", hyperparameters, clip_scale)
        if following is not None:
            outputs = self._submit_compute(*following)
            reports = None if self.fused else self._submit_reduce(outputs, norm, None)
            self.ahead = (following, (outputs, reports))

    def discard_grads(self) -> None:
        """A skipped step: the shards drop the gradient they reduced."""
        self.fire(self.on_shards("discard_grads"))

    def evaluate(self, buffers: dict | None = None) -> dict[str, float]:
        """The task's metrics at the current parameters (gradient worker 0), with the model's
        ``buffers`` when it has some."""
        return self.wait([self.backend.call(self.workers[0], "evaluate", *self.current_params(),
                                            buffers=buffers or None)])[0]

    def lbfgs(self, shard: int, method: str, *args: Any) -> Any:
        self.param_refs = None  # LBFGS moves the parameters in place
        return self.backend.call(self.shards[shard], "lbfgs", method, *args)
