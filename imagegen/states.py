"""The lifecycles of a model and of a worker, as enums every layer shares (none of them needs torch),
and the one rule for how long a failed try waits before the next.

Why enums and not strings: `/health`, `/status`, `/metrics` and the workers' heartbeats all speak of
these states, and a typo in one of them would otherwise pass silently.
"""

from enum import StrEnum


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    UNLOADED = "unloaded"
    FAILED = "failed"


def backoff(first: float, attempt: int, cap: float) -> float:
    """The wait after failed try number `attempt` (1, 2, ...): `first`, doubled for each try after
    the first, at most `cap` (a job's retries, a model's loads, a webhook's deliveries)."""
    return min(cap, first * 2 ** (attempt - 1))


class WorkerState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    STALLED = "stalled"  # its batch made no step for WATCHDOG_SECONDS: it hangs, and its jobs' leases run out
    DISCONNECTED = "disconnected"  # its broker did not answer at two beats in a row: it can take no job
    STOPPED = "stopped"  # said goodbye (SIGTERM)
    LOST = "lost"  # went quiet: no heartbeat for three periods

    @property
    def serving(self) -> bool:
        """Takes jobs now."""
        return self in {WorkerState.READY, WorkerState.BUSY}
