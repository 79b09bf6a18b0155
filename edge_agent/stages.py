"""Where a finding's time went: the seconds each instance spent per stage, and a series' figure per stage.

The stages are those of ``edge_agent_stage_duration_seconds`` (metrics.py), measured at the same points:

- ``receive``: one C-STORE, from its command to the instance durable on disk (dicom/scp.py, dicom/incoming.py);
- ``preprocess``: decoding and preprocessing one instance in the worker pool (pipeline.py);
- ``queue``: a frame's wait in its model's batcher before its batch starts (inference/batcher.py);
- ``infer``: the engine call of the batch that frame was in (inference/batcher.py);
- ``publish``: the finding's wait in the outbox, stamped when it is sent (bus/finding.py ``stamp_published``).

A series' figure is the **maximum over its instances** (over its frames for queue and infer): the longest
any one instance spent in that stage. Instances are received, decoded and inferred while others are (the
streaming design), so a sum would count overlapping time more than once and would grow with the series'
length where its delay does not. The stages do not add up to the finding's whole delay: the times in
``timings`` (received_first, received_last, completed, inferred) tell that, quiet time included.

An instance received before a restart has no receive figure in the run that finishes it: a stage no instance
of the series measured is left out rather than reported as 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

INSTANCE_STAGES = ("receive", "preprocess", "queue", "infer")
# Seconds are rounded to the microsecond: finer digits say nothing about a stage and only lengthen the finding.
_DIGITS = 6


@dataclass(slots=True)
class InstanceStages:
    """One instance's seconds per stage, filled in as it goes; None until (unless) measured."""

    receive: float | None = None
    preprocess: float | None = None
    queue: float | None = None
    infer: float | None = None

    def frames_inferred(self, queue_seconds: Iterable[float], infer_seconds: Iterable[float]) -> None:
        """Record the batcher's figures for this instance's frames: the longest of each."""
        self.queue = max(queue_seconds, default=None)
        self.infer = max(infer_seconds, default=None)


def series_stage_seconds(instances: Iterable[InstanceStages]) -> dict[str, float]:
    """Per stage, the maximum over the instances that measured it; stages none measured are left out."""
    out: dict[str, float] = {}
    for inst in instances:
        for stage in INSTANCE_STAGES:
            value = getattr(inst, stage)
            if value is not None and value >= 0 and value > out.get(stage, -1.0):
                out[stage] = value
    return {stage: round(seconds, _DIGITS) for stage, seconds in out.items()}
