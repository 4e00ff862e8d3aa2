"""Cluster mode (QUEUE_BACKEND=celery): the broker, the workers' heartbeats, and the API's queue.

Why Celery and not a queue of our own: a broker already knows how to hand a message to exactly
one consumer and take it back when that consumer's connection dies (RabbitMQ does so at once), so
with late acknowledgement a killed worker loses no job. The job record in SQL stays the one truth:
the broker carries only job ids, and every API replica answers from the record.

One broker queue per model (`queue_name`), and a worker consumes the queues of the models it
serves (WORKER_MODELS), so a job reaches only a worker that has its model. A message is a ticket:
it names the job published with it, and lets the worker that takes it run one queued job of that
model, the one the scheduling policy puts first (imagegen/scheduling.py: priority classes, then
owners in turns), read from the records. The broker hands messages over in arrival order; the
records let a light client's job pass a heavy client's sixteen, across the whole cluster.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from amqp.exceptions import ChannelError
from celery import Celery
from sqlalchemy import insert, select, update

from config import Settings
from imagegen.db import Database, db_now
from imagegen.db import workers as table
from imagegen.endings import Endings
from imagegen.jobs import Job, JobStatus
from imagegen.queues import NotReady, QueueFull, QueueUnavailable, Runners, Snapshot, TooManyJobs, seconds_until_room
from imagegen.states import ModelState, WorkerState
from imagegen.storage import ImageStore

log = logging.getLogger(__name__)

TASK = "imagegen.generate"
# Across workers, a model shows the best state any of them has it in.
MODEL_STATE_RANK = [ModelState.READY, ModelState.LOADING, ModelState.FAILED, ModelState.UNLOADED]
# How long /health reuses what its probe of the broker, the database and the storage found.
PROBE_CACHE_SECONDS = 2.0
# How long an admin call waits for the workers' answers: a busy worker answers after its batch.
CONTROL_REPLY_SECONDS = 60
# A waiting request reads its job every elapsed/20 seconds, within these bounds: a short job is seen
# ending within a few ms, and a thousand long waits cost the database little.
WAIT_POLL_SECONDS = (0.005, 0.1)


def make_celery(settings: Settings) -> Celery:
    """The Celery app both roles share: late acks, one queue, JSON messages that carry a job id."""
    app = Celery("imagegen", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,  # acknowledged after the batch ran: a killed worker's jobs go back to the queue
        task_reject_on_worker_lost=True,
        task_default_queue=settings.broker_queue,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        # celery-batches needs the whole batch in hand at once; with acks_late, unacked messages count.
        worker_prefetch_multiplier=settings.max_batch_size,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        broker_heartbeat=settings.broker_heartbeat_seconds,  # off by default: CONFIGURATION.md says why
        broker_transport_options=_transport_options(settings),
        task_publish_retry_policy={"max_retries": 1},  # a broker away for good is the reconciler's to mend
        # A batch whose broker connection dropped runs to its end and records its jobs (the leases
        # say whose they are); its messages, redelivered meanwhile, are skipped by whoever gets them.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def _transport_options(settings: Settings) -> dict[str, Any]:
    """Every socket read and write waits at most PUBLISH_TIMEOUT_SECONDS, else a broker that stops
    answering without closing the connection holds a publish, a probe of /health or the reconciler
    (and the request behind it) forever. RabbitMQ also confirms each message once it holds it:
    accepted means the broker has the job."""
    seconds = max(settings.publish_timeout_seconds, 2.0)  # above the 1 s a worker's BRPOP waits for a message
    if settings.broker_url.startswith("amqp"):
        return {"confirm_publish": True, "read_timeout": seconds, "write_timeout": seconds}
    return {"socket_timeout": seconds, "socket_connect_timeout": seconds}


def queue_name(base: str, model: str) -> str:
    """A model's broker queue: BROKER_QUEUE, a dot, the model's id with any character but letters,
    digits and `_.:-` made `_` (`imagegen.models_demo-shapes`)."""
    return f"{base}.{re.sub(r'[^A-Za-z0-9_.:-]', '_', model)}"


def publish(app: Celery, tickets: list[tuple[str, str]], timeout: float, after: float = 0) -> None:
    """Sends one message per (job id, model) to the model's queue (`queue_name`), due `after`
    seconds from now, each confirmed within `timeout` seconds.

    On a connection of its own whose every read and write also times out: a broker that blocks
    publishers (a memory or disk alarm) stops reading, and the confirm's timeout alone would leave
    the pooled connection's close waiting for ever (measured: a few ms per connection here).
    """
    sockets = {"read_timeout": timeout, "write_timeout": timeout}
    with app.connection_for_write(transport_options=sockets) as connection:
        for job_id, model in tickets:
            app.send_task(
                TASK,
                args=[job_id, model],
                queue=queue_name(app.conf.task_default_queue, model),
                countdown=after or None,
                connection=connection,
                timeout=timeout,
                confirm_timeout=timeout,
            )


def broker_ping(app: Celery) -> None:
    """Raises when the broker does not answer."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)


@dataclass(frozen=True)
class BrokerQueue:
    """The broker's task queue as it counts it: messages ready, and consumers (None where it
    cannot say: Redis counts none)."""

    ready: int
    consumers: int | None


def broker_queue(app: Celery, name: str) -> BrokerQueue | None:
    """A queue's counts, from a passive declare; None if the broker does not answer."""
    try:
        with app.connection_for_read() as conn:
            declared = conn.default_channel.queue_declare(queue=name, passive=True)
            amqp = conn.transport.driver_type == "amqp"
            return BrokerQueue(declared.message_count, declared.consumer_count if amqp else None)
    except ChannelError as exc:
        # No such queue holds nothing: not declared yet, deleted, or (on Redis) empty, as Redis drops
        # empty lists.
        return BrokerQueue(0, None) if str(exc.reply_code) == "404" else None  # an int from RabbitMQ, a str from Redis
    except Exception:  # the broker is down
        return None


def broker_queues(app: Celery, models: list[str]) -> dict[str, BrokerQueue] | None:
    """The counts of these models' queues, by model; None if the broker does not answer."""
    counts = {model: broker_queue(app, queue_name(app.conf.task_default_queue, model)) for model in models}
    return None if None in counts.values() else counts  # type: ignore[return-value]


class BrokerWatch:
    """What the broker's queues said at two checks in a row (one alone could be a worker
    reconnecting, or a blip): whether jobs wait in one with no consumer, and whether the broker did
    not answer at all. RabbitMQ cancels every consumer of a queue it deletes (an operator's mistake,
    an expiry policy, a node leaving), and a worker that misses the notice stays connected, alive
    and deaf: the API reports it, each worker re-subscribes. A broker that does not answer a worker
    (a network split, a frozen host) leaves it unable to take jobs while it goes on beating: it
    says `disconnected` until the broker answers again."""

    def __init__(self) -> None:
        self.waiting = self.silent = 0

    def check(self, queues: list[BrokerQueue] | None) -> None:
        self.silent = self.silent + 1 if queues is None else 0
        waiting = queues is not None and any(queue.ready > 0 and queue.consumers == 0 for queue in queues)
        self.waiting = self.waiting + 1 if waiting else 0

    @property
    def unconsumed(self) -> bool:
        return self.waiting >= 2

    @property
    def unreachable(self) -> bool:
        return self.silent >= 2


class WorkerRegistry:
    """The workers' heartbeats in SQL, so every API replica sees the same workers."""

    def __init__(self, db: Database, heartbeat_seconds: float) -> None:
        self.db = db
        self.stale_after = 3 * heartbeat_seconds

    def beat(
        self,
        name: str,
        device: str,
        model: str,
        state: WorkerState,
        jobs_done: int,
        started_at: float,
        report: dict[str, Any] | None = None,
    ) -> None:
        """Records that this worker is alive, what it is doing, and its figures (`report`)."""
        values = {
            "device": device,
            "model": model,
            "state": state,
            "jobs_done": jobs_done,
            "heartbeat_at": db_now(),
            "report": json.dumps(report or {}),
        }
        with self.db.transaction() as conn:
            if not conn.execute(update(table).where(table.c.name == name).values(**values)).rowcount:
                conn.execute(insert(table).values(name=name, started_at=started_at, **values))

    def describe(self) -> list[dict[str, Any]]:
        """Every worker seen in the last hour, with `alive` from its last heartbeat and the figures of
        its last report (memory, GPUs, models, histograms)."""
        age = (db_now() - table.c.heartbeat_at).label("age")  # on the database's clock, as beats are stamped
        rows = self.db.query(select(table, age).where(table.c.heartbeat_at > db_now() - 3600).order_by(table.c.name))
        workers = []
        for row in rows:
            fresh = row["age"] <= self.stale_after
            stopped = row["state"] == WorkerState.STOPPED  # said goodbye; a worker that just went quiet is lost
            workers.append(
                {
                    "name": row["name"],
                    "device": row["device"],
                    "model": row["model"],
                    "state": WorkerState(row["state"]) if fresh or stopped else WorkerState.LOST,
                    "jobs_done": row["jobs_done"],
                    "last_heartbeat": row["heartbeat_at"],
                    "heartbeat_age_seconds": round(row["age"], 3),
                    "alive": fresh and not stopped,
                    **json.loads(row["report"] or "{}"),
                }
            )
        return workers

    def alive(self) -> list[dict[str, Any]]:
        return [worker for worker in self.describe() if worker["alive"]]


class CeleryQueue:
    """The queue of a cluster's API process: jobs go to the broker; the answers come from the job
    records and the workers' heartbeats. It runs nothing and loads no model."""

    def __init__(
        self, settings: Settings, endings: Endings, images: ImageStore, registry: WorkerRegistry, app: Celery
    ) -> None:
        self.settings, self.endings, self.images, self.registry, self.app = settings, endings, images, registry, app
        self.jobs = endings.jobs
        self._alive_checked: tuple[float, list[dict[str, Any]]] = (-1.0, [])
        self._probed: tuple[float, NotReady | None] = (-PROBE_CACHE_SECONDS, None)  # (when, what was down)
        self._stopping = threading.Event()
        self._watch = BrokerWatch()
        self.unconsumed = False

    def start(self) -> None:
        """Nothing runs here: the workers are other processes."""

    def stop(self, timeout: float = 30) -> None:
        """Queued jobs belong to the broker and the workers; an API replica has nothing to drain but
        the requests waiting for jobs, which answer now (202: the job goes on without them)."""
        self._stopping.set()

    def apply(self, settings: Settings) -> None:
        self.settings = settings

    def _alive(self) -> list[dict[str, Any]]:
        """The live workers (read at most once a second: heartbeats come every few seconds anyway)."""
        now = time.monotonic()
        if now - self._alive_checked[0] > 1:
            self._alive_checked = (now, self.registry.alive())
        return self._alive_checked[1]

    def _serving(self, model: str, alive: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The live workers that serve a model (a worker's report says which: WORKER_MODELS)."""
        workers = self._alive() if alive is None else alive
        return [worker for worker in workers if model in worker.get("serves", self.settings.allowed_models)]

    def waits_for(self, model: str) -> str | None:
        if self._serving(model):
            return None
        return f"No live worker serves model `{model}`; the job waits for one (WAIT_FOR_WORKERS)."

    def room(self, client: str) -> None:
        self._room(client)

    def _room(self, client: str) -> int:
        """The queue's depth, when a job of this client fits; QueueFull or TooManyJobs otherwise."""
        depth = self.jobs.depth()
        if depth >= self.settings.max_queue_size:
            raise QueueFull(self.settings.max_queue_size, self.retry_after())
        limit = self.settings.max_jobs_per_client
        if limit and self.jobs.depth(client) >= limit:
            raise TooManyJobs(limit, self.retry_after())
        return depth

    def submit(self, job: Job) -> int:
        """Records the job, then publishes it; if the broker refuses it, the job ends failed."""
        depth = self._room(job.client)
        self.jobs.create(job)
        try:
            publish(self.app, [(job.id, job.params.model)], self.settings.publish_timeout_seconds)
        except Exception as exc:
            log.error("broker refused job %s: %s", job.id, exc)
            error = {"code": "broker_unavailable", "message": "The queue is unreachable."}
            self.endings.end(job, JobStatus.FAILED, error=error)
            raise QueueUnavailable(str(exc)) from exc
        return depth + 1

    def reconcile(self) -> dict[str, int]:
        """Mends what the broker and the records disagree on (every RECONCILE_SECONDS, on every API
        replica at once: each job is taken by one conditional UPDATE, so no two replicas publish it):

        - running jobs whose lease ran out (their worker died, hung, or lost its database) are queued
          again and published;
        - jobs waiting in the queue of a model some live worker serves, with no consumer, at two
          periods in a row make /health say so (`BrokerWatch`);
        - queued jobs the broker forgot (a purged queue, a broker restarted without persistence, an
          API killed between the record and the publish, a failed re-publish) are published again:
          while the records hold more queued jobs of a model than its queue has messages ready, the
          oldest not published for three periods go out again. A job published twice runs once:
          the record decides (`JobStore.claim`), and a spare message finds nothing to take.
        """
        recovered = [(job.id, job.params.model) for job in self.jobs.expired() if self.jobs.recover(job)]
        republished: list[tuple[str, str]] = []
        depth: dict[str, int] = {}
        for row in self.jobs.queue_by_model():
            depth[row["model"]] = depth.get(row["model"], 0) + row["jobs"]
        queues = broker_queues(self.app, list(dict.fromkeys([*self.settings.allowed_models, *depth])))
        alive = self.registry.alive()
        self._watch.check(
            None if queues is None else [queues[model] for model in queues if self._serving(model, alive)]
        )
        self.unconsumed = self._watch.unconsumed
        for model, queue in (queues or {}).items():
            missing = depth.get(model, 0) - queue.ready - sum(ticket[1] == model for ticket in recovered)
            if missing > 0:
                older = 3 * self.settings.reconcile_seconds
                republished += [(job_id, model) for job_id in self.jobs.due_for_publish(older, missing, model)]
        if recovered or republished:
            log.warning(
                "reconciler: %d jobs whose worker stopped queued again, %d forgotten by the broker published again",
                len(recovered),
                len(republished),
            )
            publish(self.app, recovered + republished, self.settings.publish_timeout_seconds)
        return {"recovered": len(recovered), "republished": len(republished)}

    def cancel(self, job_id: str) -> bool:
        """Ends the job cancelled: a worker skips it, or stops its batch at the next step."""
        return self.endings.cancel(job_id)

    def wait(self, job_id: str, timeout: float) -> bool:
        """Polls the record until the job ends; False if it is still going after `timeout` seconds."""
        started = time.monotonic()
        shortest, longest = WAIT_POLL_SECONDS
        while True:
            job = self.jobs.get(job_id)
            if job is None or job.status.finished:
                return True
            elapsed = time.monotonic() - started
            if elapsed >= timeout:
                return False
            if self._stopping.wait(min(longest, max(shortest, elapsed / 20), timeout - elapsed)):
                return True

    def load(self, model: str) -> dict[str, ModelState]:
        """Every live worker that serves the model (its WORKER_MODELS) loads it between batches."""
        serving = {worker["name"] for worker in self._serving(model, self.registry.alive())}
        answers = {
            name: answer for name, answer in self._ask_workers("imagegen_load", model=model).items() if name in serving
        }
        if not answers:
            raise self._unready(model, bool(self.registry.alive()))
        if failed := {name: answer["error"] for name, answer in answers.items() if "error" in answer}:
            reasons = "; ".join(f"{name}: {error}" for name, error in failed.items())
            raise NotReady("model_unavailable", f"Model `{model}` failed to load on {reasons}", retry_after=30)
        return {name: ModelState(answer["state"]) for name, answer in answers.items()}

    def unload(self, model: str | None = None) -> dict[str, list[str]]:
        """Every live worker unloads the model (or all) between batches; what each one unloaded."""
        return {
            name: answer.get("unloaded", [])
            for name, answer in self._ask_workers("imagegen_unload", model=model).items()
        }

    def unload_idle(self, seconds: float) -> list[str]:
        """An API replica holds no model; each worker unloads its own idle models."""
        return []

    def _ask_workers(self, command: str, **arguments: Any) -> dict[str, dict[str, Any]]:
        """Sends a control command (worker.py) to every live worker through the broker; each one's
        answer by worker name, or an error for one that did not answer within CONTROL_REPLY_SECONDS."""
        alive = [worker["name"] for worker in self.registry.alive()]
        if not alive:
            return {}
        replies = self.app.control.broadcast(
            command, arguments=arguments, reply=True, timeout=CONTROL_REPLY_SECONDS, limit=len(alive)
        )
        answers = {host.rsplit("@", 1)[0]: answer for reply in replies for host, answer in reply.items()}
        return {name: answers.get(name, {"error": "no answer"}) for name in alive}

    def snapshot(self) -> Snapshot:
        running = [job.id for job in self.jobs.running()]
        return Snapshot(self.jobs.depth(), self.settings.max_queue_size, running)

    def retry_after(self) -> int:
        workers = max(1, len(self.registry.alive()))
        depth = self.jobs.depth()
        return seconds_until_room(depth, self.settings.max_batch_size, workers, self.jobs.recent_generation_seconds())

    def problem(self, model: str, probe: bool = False) -> NotReady | None:
        """No live worker serves the model (unless WAIT_FOR_WORKERS: then its jobs wait for one);
        with `probe`, also the broker, database or storage down, or the workers loading it."""
        waiting = self.settings.wait_for_workers
        if not probe:
            return None if waiting or self._serving(model) else self._unready(model, bool(self._alive()))
        if down := self._parts_down():
            return down
        if self.unconsumed:
            return NotReady("queue_unconsumed", "Jobs wait in the broker's queue and no worker consumes it.", 5)
        alive = self.registry.alive()
        if alive and all(worker["state"] == WorkerState.DISCONNECTED for worker in alive):
            return NotReady("queue_unavailable", "No live worker reaches the broker.", 5)
        serving = self._serving(model, alive)
        if not serving:
            return None if waiting else self._unready(model, bool(alive))
        if self._model_state(serving) == ModelState.LOADING:
            return NotReady("model_loading", "The workers are loading the model.", 5)
        return None

    @staticmethod
    def _unready(model: str, any_alive: bool) -> NotReady:
        """No live worker for this model: none at all, or none of those alive serves it."""
        if not any_alive:
            return NotReady("worker_stopped", "No generation worker is alive.")
        message = f"No live worker serves model `{model}` (their WORKER_MODELS); try another model or later."
        return NotReady("model_unserved", message, retry_after=30)

    def _parts_down(self) -> NotReady | None:
        """The first of the broker, the database and the storage that does not answer, asked at most
        every PROBE_CACHE_SECONDS: /health is public and unlimited, and each asking is a round trip
        to each (a LIST, for object storage)."""
        asked, answer = self._probed
        if time.monotonic() - asked < PROBE_CACHE_SECONDS:
            return answer
        answer = None
        for part, check in (
            ("broker", lambda: broker_ping(self.app)),
            ("database", self.jobs.db.ping),
            ("storage", self.images.ping),
        ):
            try:
                check()
            except Exception as exc:
                answer = NotReady("queue_unavailable", f"The {part} does not answer: {type(exc).__name__}.", 5)
                break
        self._probed = (time.monotonic(), answer)
        return answer

    @staticmethod
    def _model_state(serving: list[dict[str, Any]]) -> ModelState:
        """A model's state as the live workers that serve it report theirs."""
        if any(worker["state"].serving for worker in serving):
            return ModelState.READY
        return ModelState.LOADING if serving else ModelState.UNLOADED

    def describe(self) -> Runners:
        """The models as the live workers report them (each model's best state, and each worker's),
        each worker seen lately with its figures, and the broker's depth."""
        workers = self.registry.describe()
        alive = [worker for worker in workers if worker["alive"]]
        models: dict[str, dict[str, Any]] = {}
        for worker in alive:
            for info in worker.get("models", []):
                entry = models.setdefault(info["id"], {"id": info["id"], "workers": {}})
                entry["workers"][worker["name"]] = info["state"]
                for key in ("quantization", "weight_bytes"):  # as a worker that has it loaded says
                    if info.get(key):
                        entry.setdefault(key, info[key])
        for entry in models.values():
            entry["state"] = min(entry["workers"].values(), key=MODEL_STATE_RANK.index)
        default = models.get(self.settings.model_id, {"id": self.settings.model_id, "workers": {}})
        serving = self._serving(self.settings.model_id, alive)
        model = {
            **default,
            "state": self._model_state(serving),
            "device": ", ".join(sorted({worker["device"] for worker in serving})) or None,
        }
        queues = broker_queues(self.app, list(self.settings.allowed_models))
        broker = None
        if queues is not None:
            counts = [queue.consumers for queue in queues.values()]
            consumers = None if None in counts else sum(counts)  # type: ignore[arg-type]
            broker = BrokerQueue(sum(queue.ready for queue in queues.values()), consumers)
        return Runners(model, list(models.values()) or [model], workers, broker)
