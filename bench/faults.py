"""`make faults`: the reliability promise, measured. Every job that got a 200 or a 202 must end
exactly once (succeeded, failed with a reason, or cancelled) within a bounded time, whatever single
part fails.

Each fault is injected into a deployment started for it alone, with jobs in flight: a cluster (one
API process, two workers on one CPU thread each, this machine's PostgreSQL in a database of its own
and RabbitMQ in a vhost of its own, images in a folder or on the S3 test server) or one local
process. The deployment runs with short timings (a lease of 3 s, the reconciler every second, a
watchdog of 15 s) so that a fault and its mending fit in a run; the defaults are the same rules with
longer periods. Then the suite waits for every accepted job and prints one row per fault:

- ended once: the record ended by the deadline (2 minutes after the fault cleared);
- ran twice: two workers ran the job at the same time while both were alive, read from the
  workers' logs (each logs the jobs it starts and what ended its run; the suite knows when it froze
  or killed which process); a worker frozen past its lease and thawed is not alive meanwhile, and
  its late result is refused by the record (its lease is gone);
- lost: accepted but without a record, or a synchronous client that got no answer at all;
- stranded: still queued or running at the deadline;
- longest: seconds from the fault clearing to the last job's end.

    .venv/bin/python -m bench.faults [--only NAME ...]   (about 8 minutes; needs root for the disk-full row)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from bench.harness import (
    ADMIN_TOKEN,
    POSTGRES,
    FrozenProxy,
    cluster_database,
    delete_queue,
    free_port,
    request,
    wait_for,
    write_results,
)
from config import ROOT
from imagegen.db import Database
from imagegen.jobs import Job, JobStore
from imagegen.queues.cluster import queue_name

VHOST = "imagegen-faults"
BROKER = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
DEADLINE_SECONDS = 120
BODY = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "steps": 150}
# Seconds instead of minutes: a lease of three heartbeats (3 s), forgotten jobs published again after
# three reconciler periods (3 s), a watchdog of 15 s (a few batches' time), and a quick backoff.
FAST = {
    "WORKER_HEARTBEAT_SECONDS": "1",
    "RECONCILE_SECONDS": "1",
    "WATCHDOG_SECONDS": "15",
    "RETRY_BACKOFF_SECONDS": "0.5",
    "MAX_BATCH_SIZE": "2",
    "MAX_STEPS": "500",
}
RUN_LINE = re.compile(r"^(\S+ \S+) \w+ .*imagegen\.engine\.runner: running \d+ jobs \(job:attempt ([^)]*)\)")
END_LINE = re.compile(
    r"^(\S+ \S+) \w+ .*imagegen\.engine\.runner: (generated|batch of|job failed|\d+ jobs were cancelled)"
)


@dataclass
class Row:
    """What became of one fault's accepted jobs."""

    fault: str
    submitted: int
    ended_once: int
    ran_twice: int
    lost: int
    stranded: int
    longest_seconds: float

    @property
    def clean(self) -> bool:
        return self.ended_once == self.submitted and not (self.ran_twice or self.lost or self.stranded)


@dataclass
class Run:
    """One worker's run of a job, from its log: [start, end), end None while it was still running."""

    worker: str
    start: float
    end: float | None = None


@dataclass
class Deployment:
    """The processes of one deployment from this checkout, their logs under `root`, and what the suite
    did to them (for telling live workers from frozen or killed ones)."""

    root: Path
    env: dict[str, str]
    cluster: bool
    database: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    frozen: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    killed: dict[str, float] = field(default_factory=dict)
    dropped: int = 0  # synchronous clients that got no answer

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.env['PORT']}"

    def spawn(self, name: str, command: list[str], **env: str) -> subprocess.Popen:
        with open(self.root / f"{name}.out", "ab") as out:
            process = subprocess.Popen(
                [sys.executable, *command],
                cwd=ROOT,
                env={**self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.processes[name] = process
        return process

    def api(self, name: str = "api", **env: str) -> subprocess.Popen:
        process = self.spawn(name, ["app.py"], **env)
        wait_for(lambda: self.ready() or process.poll() is not None, f"{name} to serve")
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {(self.root / f'{name}.out').read_text()[-2000:]}")
        return process

    def worker(self, name: str, **env: str) -> subprocess.Popen:
        return self.spawn(name, ["-m", "imagegen.worker"], WORKER_NAME=name, **env)

    def ready(self) -> bool:
        try:
            return request(f"{self.base}/health", timeout=5)[0] == 200
        except OSError:
            return False

    def kill(self, name: str) -> None:
        self.processes[name].kill()
        self.processes[name].wait(30)
        self.killed[name] = time.time()

    def freeze(self, name: str, seconds: float) -> None:
        started = time.time()
        self.processes[name].send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.processes[name].send_signal(signal.SIGCONT)
        self.frozen.setdefault(name, []).append((started, time.time()))

    def submit(self, count: int, **body: Any) -> list[str]:
        """`count` async jobs; the ids of those accepted."""
        ids = []
        for n in range(count):
            status, _, raw = request(f"{self.base}/generate", {**BODY, "seed": n, "async": True, **body}, timeout=30)
            if status == 202:
                ids.append(json.loads(raw)["id"])
        return ids

    def store(self) -> JobStore:
        return JobStore(Database(self.database))

    def busy_worker(self) -> str:
        """Waits for a job to make a step; the name of the worker running it."""
        store = self.store()
        try:
            return wait_for(lambda: next((job.worker for job in store.running() if job.step), None), "a running job")
        finally:
            store.db.close()

    def settle(self, fault: str, ids: list[str], cleared: float) -> Row:
        """Waits up to DEADLINE_SECONDS after the fault cleared for every accepted job, and counts."""
        store = self.store()
        deadline = time.monotonic() + DEADLINE_SECONDS - (time.time() - cleared)
        while time.monotonic() < deadline:
            jobs = store.many(ids)
            if len(jobs) == len(ids) and all(job.status.finished for job in jobs):
                break
            time.sleep(0.5)
        jobs = store.many(ids)
        cleared_db = store.db.now() - (time.time() - cleared)  # the fault's clearing on the database's clock
        ended = [job for job in jobs if job.status.finished]
        longest = max((job.finished_at - cleared_db for job in ended), default=0.0)
        store.db.close()
        return Row(
            fault,
            len(ids) + self.dropped,
            len(ended),
            len(self.ran_twice(ids)),
            len(ids) - len(jobs) + self.dropped,
            len(jobs) - len(ended),
            round(max(0.0, longest), 1),
        )

    def ran_twice(self, ids: list[str]) -> set[str]:
        """Jobs that a second worker started while the first, alive, was still running them."""
        runs: dict[str, list[Run]] = {}
        for log in (self.root / "logs").glob("*.log"):
            worker = log.stem.removeprefix("worker-")
            open_runs: list[tuple[str, Run]] = []
            for line in log.read_text(errors="replace").splitlines():
                if started := RUN_LINE.match(line):
                    when = _stamp(started[1])
                    for _, run in open_runs:  # a worker runs one batch at a time
                        run.end = run.end or when
                    open_runs = [(pair.split(":")[0], Run(worker, when)) for pair in started[2].split(",")]
                    for job_id, run in open_runs:
                        runs.setdefault(job_id, []).append(run)
                elif ended := END_LINE.match(line):
                    for _, run in open_runs:
                        run.end = run.end or _stamp(ended[1])
        twice = set()
        for job_id in ids:
            for first in runs.get(job_id, []):
                for second in runs[job_id]:
                    overlap = first.start < second.start < (first.end or float("inf"))
                    if first.worker != second.worker and overlap and self.alive(first.worker, second.start):
                        twice.add(job_id)
        return twice

    def alive(self, name: str, when: float) -> bool:
        """Whether the suite had neither killed nor frozen that process at that moment."""
        if name in self.killed and self.killed[name] <= when:
            return False
        return not any(start <= when <= end for start, end in self.frozen.get(name, []))

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait(30)


@contextmanager
def deployment(
    workers: int = 2, cluster: bool = True, database_proxy: FrozenProxy | None = None, **env: str
) -> Iterator[Deployment]:
    """A fresh deployment (a database and a broker queue of its own), torn down afterwards; its
    processes reach the database through `database_proxy` where one is given (the suite's own
    reads go straight to it)."""
    with tempfile.TemporaryDirectory(prefix="imagegen-faults-") as tmp, cluster_database(cluster) as database:
        root = Path(tmp)
        values = {
            **os.environ,
            "MODEL_ID": "models/tiny-random",
            "LOG_DIR": str(root / "logs"),
            "DATA_DIR": str(root / "data"),
            "IMAGE_DIR": str(root / "images"),
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "PORT": str(free_port()),
            "RATE_LIMIT": "100000/minute",
            "RATE_LIMIT_DEFAULT": "100000/minute",
            "RATE_LIMIT_COST": "off",
            "MAX_JOBS_PER_CLIENT": "0",
            "MAX_WAITS_PER_CLIENT": "0",
            "RESULT_CACHE": "false",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            **FAST,
        }
        queue = f"imagegen-faults-{secrets.token_hex(4)}"
        if cluster:
            values.update(
                QUEUE_BACKEND="celery",
                BROKER_URL=BROKER,
                BROKER_QUEUE=queue,
                DATABASE_URL=_through(database, database_proxy),
                IMAGE_DIR=str(root / "images"),
            )
        values.update(env)
        sqlite = f"sqlite:///{root / 'data' / 'imagegen.sqlite3'}"
        deploy = Deployment(root, values, cluster, database or sqlite)
        try:
            for n in range(workers):
                deploy.worker(f"w{n + 1}")
            deploy.api()
            if cluster:
                wait_for(lambda: _workers_ready(deploy) >= workers, "the workers to load")
            yield deploy
        finally:
            deploy.close()
            if cluster:
                delete_queue(BROKER, model_queue(values))


def model_queue(env: dict[str, str]) -> str:
    """The broker queue of a deployment's model (its jobs' messages)."""
    return queue_name(env["BROKER_QUEUE"], env["MODEL_ID"])


def _workers_ready(deploy: Deployment) -> int:
    status = json.loads(request(f"{deploy.base}/status")[2])
    return sum(worker["state"] == "ready" for worker in status["app"]["workers"])


# ----- the faults -----


def api_killed_between_record_and_publish() -> Row:
    """The API dies after recording jobs and before publishing them (as a kill -9 between the INSERT
    and the publish leaves them: records the broker never heard of), and restarts."""
    with deployment() as deploy:
        ids = deploy.submit(4)
        store = deploy.store()
        template = store.get(ids[0])
        for n in range(4):  # what the dead API recorded and never published
            params = replace(template.params, seeds=(100 + n,))
            ids.append(store.create(Job(params=params, client=template.client)).id)
        store.db.close()
        deploy.kill("api")
        deploy.api("api-restarted")
        return deploy.settle("API kill -9 between record and publish", ids, time.time())


def worker_killed_mid_batch() -> Row:
    with deployment() as deploy:
        ids = deploy.submit(8)
        deploy.kill(deploy.busy_worker())
        return deploy.settle("worker kill -9 mid-batch", ids, time.time())


def worker_hung() -> Row:
    """SIGSTOP for 10 s, longer than its lease (3 s): its heartbeat stops with it; then SIGCONT."""
    with deployment() as deploy:
        ids = deploy.submit(8)
        deploy.freeze(deploy.busy_worker(), 10)
        return deploy.settle("worker SIGSTOP 10 s (hung)", ids, time.time())


def batch_longer_than_broker_heartbeat() -> Row:
    """AMQP heartbeats of 1 s while each batch computes for several seconds: RabbitMQ closes the
    worker's connection mid-batch and hands its messages to the other worker."""
    with deployment(BROKER_HEARTBEAT_SECONDS="1") as deploy:
        ids = deploy.submit(6, steps=500)
        return deploy.settle("batch longer than the broker heartbeat", ids, time.time())


def broker_connections_closed() -> Row:
    with deployment() as deploy:
        ids = deploy.submit(8)
        deploy.busy_worker()
        _rabbitmqctl("close_all_connections", "-p", VHOST, "fault injected")
        return deploy.settle("broker connections closed", ids, time.time())


def database_refuses_connections() -> Row:
    """The job database refuses every connection for 20 s (and its open ones are cut)."""
    with deployment() as deploy:
        ids = deploy.submit(8)
        deploy.busy_worker()
        name = deploy.database.rsplit("/", 1)[1]
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            time.sleep(20)
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        return deploy.settle("job database refuses connections 20 s", ids, time.time())


def database_hangs() -> Row:
    """The job database accepts connections and answers nothing for 20 s (a frozen host: here a
    proxy in front of it that stops passing bytes), with DATABASE_TIMEOUT_SECONDS=2."""
    proxy = FrozenProxy(5432)
    try:
        with deployment(database_proxy=proxy, DATABASE_TIMEOUT_SECONDS="2") as deploy:
            ids = deploy.submit(8)
            deploy.busy_worker()
            proxy.freeze()
            time.sleep(20)
            proxy.thaw()
            return deploy.settle("job database hangs 20 s", ids, time.time())
    finally:
        proxy.close()


def object_storage_down() -> Row:
    """The S3-compatible store (moto's server) stops for 20 s, then comes back empty (its bucket made
    again, as an operator restoring the store would)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    s3 = {"AWS_ACCESS_KEY_ID": "faults", "AWS_SECRET_ACCESS_KEY": "faults", "AWS_DEFAULT_REGION": "us-east-1"}
    url = f"s3://imagegen-faults-{secrets.token_hex(4)}/images"

    def start_store() -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-p", str(port)],
            env={**os.environ, **s3},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _answers(endpoint), "the S3 test server")
        import fsspec

        fsspec.filesystem("s3", endpoint_url=endpoint, key="faults", secret="faults").makedirs(url, exist_ok=True)
        return process

    store_process = start_store()
    try:
        with deployment(IMAGE_DIR=url, S3_ENDPOINT_URL=endpoint, **s3) as deploy:
            ids = deploy.submit(8)
            deploy.busy_worker()
            store_process.kill()
            store_process.wait(10)
            time.sleep(20)
            store_process = start_store()
            return deploy.settle("object storage down 20 s", ids, time.time())
    finally:
        store_process.kill()


def image_disk_full() -> Row:
    """The image folder is a 64 MB filesystem, filled up while jobs run; room is made after 20 s."""
    with tempfile.TemporaryDirectory(prefix="imagegen-disk-") as disk:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", disk], capture_output=True).returncode:
            return Row("image disk full (needs root to mount)", 0, 0, 0, 0, 0, 0.0)
        try:
            with deployment(IMAGE_DIR=disk) as deploy:
                ids = deploy.submit(8)
                deploy.busy_worker()
                filler = Path(disk) / "filler"
                with open(filler, "wb", buffering=0) as out:  # unbuffered: nothing left to flush at close
                    try:
                        while True:
                            out.write(b"\0" * 65536)
                            out.flush()
                    except OSError:  # full
                        pass
                time.sleep(20)
                filler.unlink()
                return deploy.settle("image disk full 20 s", ids, time.time())
        finally:
            subprocess.run(["umount", "-l", disk], capture_output=True)


def second_local_process() -> Row:
    """A second `python app.py` on the same DATA_DIR while the first has jobs queued."""
    with deployment(workers=0, cluster=False) as deploy:
        ids = deploy.submit(8)
        second = deploy.spawn("second", ["app.py"], PORT=str(free_port()), LOG_DIR=str(deploy.root / "logs-2"))
        second.wait(60)
        assert second.returncode != 0, "the second process must refuse DATA_DIR"
        return deploy.settle("second local process on one DATA_DIR", ids, time.time())


def sigterm_during_synchronous_requests() -> Row:
    """SIGTERM to a local server while synchronous clients wait (one job running, the others
    queued); it restarts on the same data."""
    with deployment(workers=0, cluster=False, MAX_BATCH_SIZE="1", SHUTDOWN_GRACE_SECONDS="60") as deploy:
        answers: list[tuple[int, Any]] = []

        def ask(seed: int) -> None:
            try:
                status, _, raw = request(f"{deploy.base}/generate", {**BODY, "seed": seed}, timeout=120)
                answers.append((status, json.loads(raw)))
            except OSError:
                deploy.dropped += 1

        askers = [threading.Thread(target=ask, args=(seed,)) for seed in range(4)]
        for asker in askers:
            asker.start()
        deploy.busy_worker()
        deploy.processes["api"].send_signal(signal.SIGTERM)
        for asker in askers:
            asker.join(120)
        deploy.processes["api"].wait(60)
        deploy.api("api-restarted")
        ids = [body["id"] for status, body in answers if status in (200, 202)]
        deploy.dropped += sum(status not in (200, 202) for status, _ in answers)
        return deploy.settle("SIGTERM during synchronous requests", ids, time.time())


def queue_purged() -> Row:
    """The broker's queue is purged while jobs wait in it (one worker, so most of them wait)."""
    with deployment(workers=1) as deploy:
        ids = deploy.submit(8)
        deploy.busy_worker()
        _rabbitmqctl("purge_queue", "-p", VHOST, model_queue(deploy.env))
        return deploy.settle("broker queue purged while jobs wait", ids, time.time())


def queue_deleted() -> Row:
    """The broker's queue is deleted while jobs wait in it (an operator's mistake, an expiry policy,
    a classic queue's node leaving): RabbitMQ cancels the workers' consumers."""
    with deployment() as deploy:
        ids = deploy.submit(8)
        deploy.busy_worker()
        _rabbitmqctl("delete_queue", "-p", VHOST, model_queue(deploy.env))
        ids += deploy.submit(4)  # published while the queue is gone, or into the one the reconciler made again
        return deploy.settle("broker queue deleted while jobs wait", ids, time.time())


FAULTS: dict[str, Callable[[], Row]] = {
    "api-kill": api_killed_between_record_and_publish,
    "worker-kill": worker_killed_mid_batch,
    "worker-hung": worker_hung,
    "heartbeat": batch_longer_than_broker_heartbeat,
    "broker-close": broker_connections_closed,
    "database": database_refuses_connections,
    "database-hangs": database_hangs,
    "storage": object_storage_down,
    "disk-full": image_disk_full,
    "second-process": second_local_process,
    "sigterm": sigterm_during_synchronous_requests,
    "purge": queue_purged,
    "queue-deleted": queue_deleted,
}


def prepare_broker() -> None:
    """The suite's own RabbitMQ vhost, so closing its connections touches nothing else."""
    _rabbitmqctl("add_vhost", VHOST, check=False)
    _rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")


def table(rows: list[Row]) -> str:
    lines = [
        "| fault | submitted | ended once | ran twice | lost | stranded | longest to end (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.fault} | {row.submitted} | {row.ended_once} | {row.ran_twice} | {row.lost} | "
            f"{row.stranded} | {row.longest_seconds} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(FAULTS), help="run only these faults")
    args = parser.parse_args()
    prepare_broker()
    rows = []
    for name in args.only or FAULTS:
        started = time.monotonic()
        rows.append(FAULTS[name]())
        print(f"{name}: {rows[-1]} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    print(table(rows))
    if not args.only:
        write_results("faults", {"rows": [row.__dict__ for row in rows], "table": table(rows)})
    raise SystemExit(0 if all(row.clean or not row.submitted for row in rows) else 1)


# ----- plumbing -----


def _through(database: str | None, proxy: FrozenProxy | None) -> str:
    """The database's URL, through the proxy where there is one."""
    if not database or proxy is None:
        return database or ""
    from sqlalchemy.engine import make_url

    return make_url(database).set(port=proxy.port).render_as_string(hide_password=False)


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _answers(url: str) -> bool:
    try:
        request(url, timeout=2)
        return True
    except OSError:
        return False


def _rabbitmqctl(*arguments: str, check: bool = True) -> None:
    command = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([command, *arguments], check=check, capture_output=True, timeout=60)


if __name__ == "__main__":
    main()
