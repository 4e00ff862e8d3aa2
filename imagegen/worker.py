"""`python -m imagegen.worker` (`make worker`): one cluster worker process that owns one device.

It serves the models of WORKER_MODELS (all by default), loading at start as many as
MAX_LOADED_MODELS allows on DEVICE, then consumes their queues' messages with celery-batches (up to
MAX_BATCH_SIZE messages, or whatever arrived within BATCH_WAIT_MS) in one solo-pool process; each
message lets it take one queued job of its model, the one the scheduling policy puts first, and
it feeds them to the same engine the local mode runs. Messages are acknowledged only after their
batch ran, so a worker killed mid-batch hands its jobs back to the broker; the job record decides
what runs again (an ended job never does). A heartbeat in the database tells every API replica
that this worker is alive, what it runs, and how much it has done.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.worker.control import control_command
from celery_batches import Batches

from config import Settings, load_settings
from imagegen import scheduling
from imagegen.access import Access
from imagegen.db import Database
from imagegen.endings import Endings
from imagegen.engine import build_engine, runner
from imagegen.engine.runner import Engine, plan_batches
from imagegen.jobs import Job, JobStatus, JobStore
from imagegen.logs import job_context, setup_logging
from imagegen.monitoring import Monitor, runner_report
from imagegen.protocol import TUNABLES
from imagegen.queues.cluster import (
    TASK,
    BrokerWatch,
    CeleryQueue,
    WorkerRegistry,
    broker_queues,
    make_celery,
    publish,
    queue_name,
)
from imagegen.runtime import LiveSettings
from imagegen.services import private_files
from imagegen.states import WorkerState
from imagegen.storage import ImageStore
from imagegen.webhooks import WebhookSender

log = logging.getLogger("imagegen.worker")


class JobBatches(Batches):
    """celery-batches, with its flush timer re-armed by the first message after each flush.

    Its timer repeats from the first message ever buffered; with the solo pool it falls due while a
    batch runs, so the first message that arrives afterwards was flushed alone before the others the
    broker was still delivering (measured: batches of 1 between batches of 4). Disarming it after a
    flush makes BATCH_WAIT_MS count from a batch's first message, as it does in local mode.
    (Reaches into celery-batches' `_tref`, `_buffer` and `_pending`; the pin in requirements.txt
    keeps them as this was written against.)
    """

    def _do_flush(self) -> None:
        super()._do_flush()
        if self._tref is not None and self._buffer.empty() and self._pending.empty():
            self._tref.cancel()
            self._tref = None


class Every:
    """A thread of its own that runs `tick` every `seconds` until stopped. A tick that fails is
    logged, and the next one tries again: the database or the broker may be away for a moment."""

    def __init__(self, name: str, seconds: float) -> None:
        self.seconds = seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                self.tick()
            except Exception as exc:
                log.warning("%s failed: %s", self._thread.name, exc)


class Heartbeat(Every):
    """Writes this worker's row every WORKER_HEARTBEAT_SECONDS, so a long batch never makes a live
    worker look dead, and renews the leases of the batch it runs. Each beat carries the worker's
    figures (memory, GPUs, models, generation histograms: `monitoring.runner_report`), which the
    API shows in /status and /metrics. The watchdog: a batch with no step for WATCHDOG_SECONDS
    makes the worker `stalled`, and its leases are no longer renewed, so the others take its jobs;
    a broker that the `watch` found silent twice makes it `disconnected`."""

    def __init__(
        self,
        registry: WorkerRegistry,
        name: str,
        settings: Settings,
        engine: Engine,
        watch: Watch | None = None,
    ) -> None:
        super().__init__("heartbeat", settings.worker_heartbeat_seconds)
        self.registry, self.name, self.settings, self.engine = registry, name, settings, engine
        self.watch = watch
        self.state = WorkerState.LOADING
        self.started = time.time()

    def set(self, state: WorkerState) -> None:
        """Changes the state and says so at once."""
        self.state = state
        self.beat()

    def report(self, state: WorkerState) -> None:
        """Changes the state; the next beat says so (no database write per batch)."""
        self.state = state

    def beat(self) -> None:
        self.registry.beat(
            self.name,
            self.engine.models.device,
            self.settings.served_models[0],
            self.reported(),
            self.engine.jobs_done,
            self.started,
            {
                **runner_report(self.engine.monitor, self.engine.models.describe()),
                "serves": list(self.settings.served_models),
                "torch_threads": self.engine.models.threads,
                "settings": {name: getattr(self.engine.settings, name) for name in TUNABLES},
            },
        )

    def reported(self) -> WorkerState:
        """The state the registry shows: what the worker does, unless it hangs or its broker is away."""
        if self.engine.stalled():
            return WorkerState.STALLED
        if self.watch and self.watch.broker.unreachable and self.state != WorkerState.STOPPED:
            return WorkerState.DISCONNECTED
        return self.state

    def tick(self) -> None:
        self.beat()
        self.engine.renew()

    def start(self) -> None:
        self.beat()
        super().start()

    def stop(self) -> None:
        super().stop()
        self.set(WorkerState.STOPPED)


class Commands:
    """What the API asks of this worker through the broker (admin load and unload, /cleanup), and
    what its idle watch asks of it. Celery runs control commands on the worker's main thread
    between batches, the thread that runs the batches, so the one-thread rule holds here too.
    Each answer is a JSON object: what was done, or `error`. After each command `done` runs (a
    heartbeat), so the API reads the models' new states as soon as it has the answer."""

    def __init__(self, engine: Engine, done: Callable[[], None], queues: list[str]) -> None:
        self.engine, self.done, self.queues = engine, done, queues

    def load(self, model: str) -> dict[str, Any]:
        if model not in self.engine.settings.served_models:
            return {"error": f"`{model}` is not one of this worker's WORKER_MODELS"}
        try:
            self.engine.models.get(model)
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"state": self.engine.models.state(model).state}

    def unload(self, model: str | None = None) -> dict[str, Any]:
        return {"unloaded": self.engine.models.unload(model)}

    def unload_idle(self) -> dict[str, Any]:
        """Unloads the models unused for MODEL_IDLE_TIMEOUT_SECONDS (judged here, on the main thread,
        so a model that a batch has just used stays)."""
        idle = self.engine.models.idle(self.engine.settings.model_idle_timeout_seconds)
        unloaded = self.engine.models.unload_many(idle)
        if unloaded:
            log.info("unloaded idle models: %s", ", ".join(unloaded))
        return {"unloaded": unloaded}

    def register(self) -> None:
        """Makes the commands known to Celery's worker (imagegen_load, imagegen_unload, imagegen_unload_idle,
        imagegen_resubscribe)."""

        @control_command(name="imagegen_load", args=[("model", str)], signature="<model>")
        def _load(_state: Any, model: str) -> dict[str, Any]:
            return self._then_report(self.load(model))

        @control_command(name="imagegen_unload", args=[("model", str)], signature="[model]")
        def _unload(_state: Any, model: str | None = None) -> dict[str, Any]:
            return self._then_report(self.unload(model))

        @control_command(name="imagegen_unload_idle")
        def _unload_idle(_state: Any) -> dict[str, Any]:
            return self._then_report(self.unload_idle())

        @control_command(name="imagegen_resubscribe")
        def _resubscribe(state: Any) -> dict[str, Any]:
            return resubscribe(state.consumer, self.queues)

    def _then_report(self, answer: dict[str, Any]) -> dict[str, Any]:
        try:
            self.done()
        except Exception as exc:  # the answer still counts; the next heartbeat reports the change
            log.warning("could not report after a command: %s", exc)
        return answer


class Watch(Every):
    """What a worker checks every WORKER_HEARTBEAT_SECONDS, on a thread of its own (a broker that
    does not answer holds each check for its timeouts, and beats and lease renewals must not wait
    on it). It asks the worker's main thread, through the broker, to unload models left idle and
    to consume the queue again when jobs wait there with no consumer; it notes a broker that does
    not answer (`BrokerWatch`: the next beat says `disconnected`, and the API counts the worker
    out); and every RECONCILE_SECONDS it runs the cluster's reconciler, as every API replica does:
    with no replica alive, a dead worker's jobs would otherwise stay `running` (each job is taken
    by one conditional UPDATE, so reconcilers never publish a job twice)."""

    def __init__(self, engine: Engine, celery: Celery, hostname: str, reconciler: CeleryQueue) -> None:
        super().__init__("watch", engine.settings.worker_heartbeat_seconds)
        self.engine, self.celery, self.hostname, self.reconciler = engine, celery, hostname, reconciler
        self.broker = BrokerWatch()
        self.reconciled_at = time.monotonic()

    def tick(self) -> None:
        timeout = self.engine.settings.model_idle_timeout_seconds
        if timeout and self.engine.models.idle(timeout):
            self.celery.control.broadcast("imagegen_unload_idle", destination=[self.hostname])
        was_unreachable = self.broker.unreachable
        queues = broker_queues(self.celery, list(self.engine.settings.served_models))
        self.broker.check(None if queues is None else list(queues.values()))
        if self.broker.unreachable != was_unreachable:
            lost = "does not answer: this worker takes no job until it does"
            log.warning("the broker %s", lost if self.broker.unreachable else "answers again")
        if self.broker.unconsumed:
            self.celery.control.broadcast("imagegen_resubscribe", destination=[self.hostname])
        if time.monotonic() - self.reconciled_at >= self.engine.settings.reconcile_seconds:
            self.reconciled_at = time.monotonic()
            self.reconciler.reconcile()


def resubscribe(consumer: Any, queues: list[str]) -> dict[str, Any]:
    """Consumes its models' queues again: the broker holds jobs and counts no consumer of one, so
    this worker's was cancelled (a deleted queue) and the notice did not make Celery reconnect.
    Forgets the old consumer tags first, since Celery still takes them for live ones. `consumer` is
    Celery's."""
    for queue in queues:
        consumer.task_consumer.cancel_by_queue(queue)
        consumer.add_task_queue(queue)
    log.warning("the broker counted no consumer of a queue while jobs waited: consuming %s again", ", ".join(queues))
    return {"resubscribed": queues}


class Consumer:
    """What the worker does with one flush of messages (`choose`): as many queued jobs of each
    model as it has messages for that model, the ones the scheduling policy puts first, in batches
    by the engine's rule; a retried job goes back to the broker as a new message, due after its
    pause. An admin's change (`adjust`) applies at
    once when no flush runs, else when the running one ends, so no batch sees its settings change
    and an idle worker reports the change in its next beat."""

    def __init__(
        self,
        engine: Engine,
        republish: Callable[[list[tuple[str, str]], float], None],
        report: Callable[[WorkerState], None],
    ) -> None:
        self.engine, self.republish, self.report = engine, republish, report
        self._lock = threading.Lock()
        self._running = False
        self._pending: Settings | None = None
        self._turns = scheduling.Turns()

    def adjust(self, changed: Settings) -> None:
        with self._lock:
            if self._running:
                self._pending = changed
            else:
                self.engine.settings = changed

    def __call__(self, tickets: list[tuple[str, str]]) -> None:
        """One flush of messages, each a (job id, model) ticket."""
        with self._lock:
            self._running = True
        try:
            self._consume(list(dict.fromkeys(tickets)))  # a redelivery may repeat one
        finally:
            with self._lock:
                self._running = False
                if self._pending is not None:
                    self.engine.settings, self._pending = self._pending, None

    def choose(self, tickets: list[tuple[str, str]]) -> list[Job]:
        """The jobs these messages let this worker run. A message names the job published with it
        and its model, and stands for one queued job of that model: the policy picks which (a
        light client's job passes a heavy client's queued before it). A named job still running is
        a redelivery after its worker stopped; it comes first, and the claim decides whether its
        lease ran out. A spare message (its job taken through another's) finds nothing to take."""
        named = self.engine.jobs.many([job_id for job_id, _model in tickets])
        chosen = [job for job in named if job.status == JobStatus.RUNNING]
        wanted: dict[str, int] = {}
        for _job_id, model in tickets:
            wanted[model] = wanted.get(model, 0) + 1
        for job in chosen:
            wanted[job.params.model] -= 1
        for model, count in wanted.items():
            waiting = self.engine.jobs.waiting(model, self.engine.settings.max_queue_size)
            chosen += self._turns.order(waiting)[:count]
        return chosen

    def _consume(self, tickets: list[tuple[str, str]]) -> None:
        try:
            chosen = self.choose(tickets)
            batches = plan_batches(chosen, self.engine.settings.max_batch_size)
            for batch in scheduling.loaded_first(batches, self.engine.models.loaded()):
                self._turns.taken(batch)
                self.report(WorkerState.BUSY)
                for again in self.engine.run(batch):  # a new message each: this one is acked with its batch
                    self.republish([(again.job.id, again.job.params.model)], again.after)
            # A job another worker took first (through its own message) leaves this message unused:
            # it goes out again, so every queued job keeps a message.
            lost = [
                job
                for job in self.engine.jobs.many([job.id for job in chosen])
                if job.worker not in (None, self.engine.name)
            ]
            if lost:
                self.republish([(job.id, job.params.model) for job in lost], 0)
        except Exception:
            # Not a job's own failure (the engine ends those) but the database's or the broker's: these
            # messages are acknowledged when this returns, so their jobs go back to the queue as new
            # ones, after a pause that keeps an outage from becoming a busy loop. Ended jobs are skipped.
            with job_context([job_id for job_id, _model in tickets], []):
                log.exception(
                    "batch of %d jobs could not run; queued again in %ss", len(tickets), runner.OUTAGE_PAUSE_SECONDS
                )
            time.sleep(runner.OUTAGE_PAUSE_SECONDS)
            self.republish(tickets, 0)  # if this fails too, the reconciler publishes them again
        self.report(WorkerState.READY)


def main() -> None:
    """Builds the engine, loads the model, registers the batch task and runs the Celery worker."""
    settings = load_settings()
    if settings.queue_backend != "celery":
        raise SystemExit("imagegen.worker needs QUEUE_BACKEND=celery (see docs/scaling.md)")
    name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    private_files(settings)
    setup_logging(settings, f"worker-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log")
    db = Database(settings.database, settings.database_timeout_seconds)
    live = LiveSettings(settings, db)
    settings = live.current  # with the admin's stored changes
    jobs = JobStore(db)
    images = ImageStore(settings.image_dir, db, settings.s3_endpoint_url)
    monitor = Monitor()
    webhooks = WebhookSender(settings, jobs, Access.from_settings(settings))
    endings = Endings(jobs, monitor, webhooks.notify)
    engine = build_engine(settings, images, endings, monitor, name, catalogue=live.catalogue)
    celery = make_celery(settings)
    hostname = f"{name}@{socket.gethostname()}"  # the worker's name in Celery, for messages to itself

    registry = WorkerRegistry(db, settings.worker_heartbeat_seconds)
    watch = Watch(engine, celery, hostname, CeleryQueue(settings, endings, images, registry, celery))
    heartbeat = Heartbeat(registry, name, settings, engine, watch)
    served = settings.served_models
    queues = [queue_name(settings.broker_queue, model) for model in served]
    Commands(engine, heartbeat.beat, queues).register()
    consume = Consumer(
        engine,
        lambda tickets, after: publish(celery, tickets, settings.publish_timeout_seconds, after),
        heartbeat.report,
    )

    def adjusted(changed: Settings) -> None:
        """An admin's change (read from the database by `live`): the log level now, the rest between
        batches."""
        logging.getLogger().setLevel(changed.log_level)
        consume.adjust(changed)

    @celery.task(
        name=TASK,
        base=JobBatches,
        flush_every=settings.max_batch_size,
        # at least 5 ms: the broker's deliveries after an acknowledgement take a moment to arrive
        flush_interval=max(settings.batch_wait_ms, 5) / 1000,
        acks_late=True,
    )
    def generate(requests: list[Any]) -> None:
        """One flush of messages, each carrying a job id and its model."""
        consume([(request.args[0], request.args[1]) for request in requests])

    live.listeners.append(adjusted)
    live.start()
    webhooks.start()
    heartbeat.start()
    watch.start()
    log.info("worker %s: serving %s on %s", name, ", ".join(served), engine.models.device)
    try:
        engine.models.get(served[0])
    except Exception as exc:
        watch.stop()
        heartbeat.stop()
        raise SystemExit(f"worker {name}: model {served[0]} failed to load: {exc}") from None
    for model in served[1 : settings.max_loaded_models]:  # the others it serves, as far as memory allows
        try:
            engine.models.get(model)
        except Exception as exc:  # its jobs load it again when they come
            log.warning("worker %s: model %s failed to load at start: %s", name, model, exc)
    heartbeat.set(WorkerState.READY)
    log.info("worker %s: consuming %s from %s", name, ", ".join(queues), celery.connection_for_read().as_uri())
    try:
        celery.worker_main(
            [
                "worker",
                "--pool=solo",
                f"--hostname={hostname}",
                f"--queues={','.join(queues)}",
                f"--loglevel={settings.log_level}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        watch.stop()
        heartbeat.stop()
        webhooks.stop()
        live.stop()
        db.close()
        log.info("worker %s: stopped after %d jobs", name, engine.jobs_done)


if __name__ == "__main__":
    main()
