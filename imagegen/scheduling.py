"""Which queued job runs next: a policy, not arrival order alone.

Priority classes (config.PRIORITIES): a job of a higher class goes before any of a lower one. An
API key's jobs take its class (`name:key:class` in API_KEYS); a request may lower its own, and an
admin may set any. The rules below work within a class.

Fair turns: owners (API keys, or addresses without keys) take turns, each owner's first waiting
job before anyone's second, so one client's sixteen queued jobs do not stand in front of everyone
else's. A batch's other places go in the same order, so a client's batch-mates are its own only
when no one else waits.

Loaded models first: with jobs for several models waiting, the next batch is for a model already
in memory, so a worker whose MAX_LOADED_MODELS is smaller than the models its clients name does
not unload and load again for each batch (real models take seconds to a minute to load). A job for
another model waits at most MODEL_SWITCH_WAIT_MS for that: once the oldest job has waited so long,
it goes next whatever it loads, so no job starves.

Both queues use it: the local queue for each batch; a cluster worker for each flush of messages,
each of which lets it take one queued job of its model, chosen from the records by this policy
(queues/cluster.py), so the turns reach across the whole queue, not only the messages at hand.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Collection, Mapping, Sequence

from imagegen.jobs import Job


def in_turns(ready: Sequence[Job], served: Mapping[str, int]) -> list[Job]:
    """The ready jobs (oldest first) by class, highest first, and within a class in fair turns:
    every owner's first, then every owner's second, ...; within a round, the owner whose last turn
    (`served`, a rising count) was longest ago first, an owner never served before anyone; then
    arrival."""
    seen: dict[tuple[int, str], int] = {}
    ranked = []
    for index, job in enumerate(ready):
        round_ = seen[job.priority, job.client] = seen.get((job.priority, job.client), -1) + 1
        ranked.append(((-job.priority, round_, served.get(job.client, -1), index), job))
    return [job for _rank, job in sorted(ranked, key=lambda pair: pair[0])]


def positions(queued: Sequence[Job]) -> dict[str, int]:
    """Each queued job's place (1: next) as the policy orders the whole queue (oldest first), for
    any replica to answer alike; a runner's own memory of past turns may break a tie otherwise."""
    return {job.id: place for place, job in enumerate(in_turns(queued, {}), 1)}


class Turns:
    """Whose turn it is, for one queue or worker: each owner's last turn, counted as batches start."""

    def __init__(self) -> None:
        self._served: dict[str, int] = {}
        self._count = itertools.count()

    def order(self, ready: Sequence[Job]) -> list[Job]:
        """The ready jobs (oldest first) in turns (`in_turns`)."""
        return in_turns(ready, self._served)

    def taken(self, batch: Sequence[Job]) -> None:
        """A batch starts: its owners have had their turn."""
        for job in batch:
            self._served[job.client] = next(self._count)


def first(ready: Sequence[Job], loaded: Collection[str], patience_seconds: float, now: float | None = None) -> Job:
    """The job to start the next batch with, from `ready` in turn order: the head, if its model is
    loaded or it has waited `patience_seconds`, else the first of its class whose model is loaded,
    else the head (a loaded model never lets a lower class pass)."""
    head = ready[0]
    waited = (time.time() if now is None else now) - head.created_at
    if waited >= patience_seconds or head.params.model in loaded:
        return head
    return next((job for job in ready if job.priority == head.priority and job.params.model in loaded), head)


def loaded_first(batches: list[list[Job]], loaded: Collection[str]) -> list[list[Job]]:
    """Batches for loaded models before the others, each group in its order (a worker's batches
    of one delivery all run now, so none waits long)."""
    return sorted(batches, key=lambda batch: batch[0].params.model not in loaded)
