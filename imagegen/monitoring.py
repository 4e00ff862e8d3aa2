"""Figures about the process and the app: what /status reports and /metrics exposes.

Why both come from here: one place records each request and generation, so the JSON summary for
people and the Prometheus series for machines never disagree.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from config import PRIORITIES, Settings
from imagegen.cpu import usable_cores
from imagegen.states import ModelState

if TYPE_CHECKING:
    from imagegen.jobs import JobStore
    from imagegen.queues import JobQueue
    from imagegen.storage import ImageStore

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _window_summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"avg": None, "p50": None, "p95": None, "count": 0}
    ordered = sorted(values)
    return {
        "avg": round(statistics.fmean(ordered), 4),
        "p50": round(ordered[int(0.50 * (len(ordered) - 1))], 4),
        "p95": round(ordered[int(0.95 * (len(ordered) - 1))], 4),
        "count": len(ordered),
    }


class Monitor:
    """Counters and latency windows for one app; its own Prometheus registry so apps never mix."""

    def __init__(self, window: int = 1000) -> None:
        self.started = time.time()
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imagegen_requests", "HTTP requests by route and status.", ["route", "status"], registry=self.registry
        )
        self.request_seconds = Histogram(
            "imagegen_request_seconds",
            "HTTP request latency.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generation_seconds = Histogram(
            "imagegen_generation_seconds",
            "Time of one pipeline call (a batch).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "imagegen_batch_size",
            "Images per pipeline call.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.errors = Counter("imagegen_errors", "Errors by code.", ["code"], registry=self.registry)
        self.endings = Counter(
            "imagegen_jobs_ended",
            "Jobs ended in this process, by status (`retried`: sent back to the queue for another attempt).",
            ["status"],
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._responses: deque[float] = deque(maxlen=window)
        self._generations: deque[float] = deque(maxlen=window)
        self._total = 0
        self._failed = 0

    def record_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)
        with self._lock:
            self._total += 1
            self._failed += status >= 400
            self._responses.append(seconds)

    def record_error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def record_ending(self, status: str) -> None:
        self.endings.labels(status).inc()

    def record_generation(self, seconds: float, images: int) -> None:
        self.generation_seconds.observe(seconds)
        self.batch_size.observe(images)
        with self._lock:
            self._generations.append(seconds)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            total, failed = self._total, self._failed
            responses, generations = list(self._responses), list(self._generations)
        return {
            "requests": {"total": total, "errors": failed, "error_rate": round(failed / total, 4) if total else 0.0},
            "response_seconds": _window_summary(responses),
            "generation_seconds": _window_summary(generations),
        }


class Alerts:
    """RAM, GPU memory and disk above their thresholds: listed in /status, logged once per crossing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def check(self, system: dict[str, Any]) -> list[dict[str, Any]]:
        """Compares the system figures with the thresholds; warns when one newly goes above."""
        readings = [
            ("ram", system["ram"]["percent"], self.settings.alert_percent),
            ("disk", system["disk"]["percent"], self.settings.alert_percent),
        ]
        for gpu in system["gpus"] or []:
            readings.append((f"gpu{gpu['index']}_memory", gpu["percent"], self.settings.alert_percent))
        alerts = [{"name": n, "percent": v, "threshold": t} for n, v, t in readings if v >= t]
        names = {alert["name"] for alert in alerts}
        with self._lock:
            for alert in alerts:
                if alert["name"] not in self._active:
                    log.warning(
                        "alert: %s at %.1f%% (threshold %.1f%%)", alert["name"], alert["percent"], alert["threshold"]
                    )
            for cleared in self._active - names:
                log.info("alert cleared: %s", cleared)
            self._active = names
        return alerts


def gpu_memory() -> list[dict[str, Any]] | None:
    """Per-GPU memory from torch.cuda, or None where there is no CUDA (torch stays unimported then)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(
            {
                "index": index,
                "name": torch.cuda.get_device_name(index),
                "total_bytes": total,
                "used_bytes": total - free,
                "allocated_bytes": torch.cuda.memory_allocated(index),
                "percent": round(100 * (total - free) / total, 1),
            }
        )
    return gpus


def disk_figures(folder: Path) -> dict[str, Any]:
    """The disk a folder is on: its size, what is free, and how full it is."""
    disk = shutil.disk_usage(folder)
    percent = round(100 * (disk.total - disk.free) / disk.total, 1)
    return {"path": folder.name, "total_bytes": disk.total, "free_bytes": disk.free, "percent": percent}


class CpuWindow:
    """The machine's CPU use over the last half minute to minute, not since the previous reading:
    psutil's `cpu_percent()` counts from whoever asked last (the alert check asks every few
    seconds), so /status read 0.0 right after a generation. The window starts at a reading at least
    30 s old, moved on once it is a minute old."""

    def __init__(self) -> None:
        self._start = self._last = (time.monotonic(), psutil.cpu_times())

    def percent(self) -> float:
        now = (time.monotonic(), psutil.cpu_times())
        if now[0] - self._start[0] >= 60 and now[0] - self._last[0] >= 30:
            self._start = self._last
        if now[0] - self._last[0] >= 30:
            self._last = now
        busy, total = (_busy(now[1]) - _busy(self._start[1])), (sum(now[1]) - sum(self._start[1]))
        return round(100 * busy / total, 1) if total > 0 else 0.0


def _busy(times: Any) -> float:
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


CPU = CpuWindow()


def system_status(image_dir: Path, started: float, database_dir: Path | None = None) -> dict[str, Any]:
    """CPU, RAM, process RSS, GPU memory, the image disk (and an embedded database's) and uptime."""
    memory = psutil.virtual_memory()
    figures = {
        "cpu_percent": CPU.percent(),
        "usable_cores": usable_cores(),
        "ram": {"total_bytes": memory.total, "used_bytes": ram_used_bytes(), "percent": memory.percent},
        "process_rss_bytes": psutil.Process().memory_info().rss,
        "gpus": gpu_memory(),
        "disk": disk_figures(image_dir),
        "uptime_seconds": round(time.time() - started, 1),
    }
    if database_dir is not None:
        figures["database_disk"] = disk_figures(database_dir)
    return figures


def histogram_figures(histogram: Histogram) -> dict[str, Any]:
    """A histogram's cumulative bucket counts and sum, to carry to another process."""
    samples = histogram.collect()[0].samples
    buckets = [[sample.labels["le"], sample.value] for sample in samples if sample.name.endswith("_bucket")]
    return {"buckets": buckets, "sum": next(sample.value for sample in samples if sample.name.endswith("_sum"))}


def runner_report(monitor: Monitor, models: list[dict[str, Any]]) -> dict[str, Any]:
    """What a cluster worker tells the API with each heartbeat: its memory, GPUs, models and histograms."""
    return {
        "ram_used_bytes": ram_used_bytes(),
        "process_rss_bytes": psutil.Process().memory_info().rss,
        "gpus": gpu_memory(),
        "models": models,
        "generation_seconds": histogram_figures(monitor.generation_seconds),
        "batch_size": histogram_figures(monitor.batch_size),
    }


def ram_used_bytes() -> int:
    """RAM in use as psutil's `percent` counts it: all but what is available to new processes (its own
    `used` leaves out buffers and cache that cannot be freed, so the two would disagree)."""
    memory = psutil.virtual_memory()
    return memory.total - memory.available


class AppFigures(Collector):
    """The figures /metrics reads at scrape time: the queue, models, memory and images of this
    process, and each cluster worker's from its last report."""

    def __init__(self, queue: JobQueue, images: ImageStore, jobs: JobStore) -> None:
        self.queue, self.images, self.jobs = queue, images, jobs

    def collect(self) -> Iterator[Metric]:
        queue = self.queue.snapshot()
        runners = self.queue.describe()
        images = self.images.stats()
        gauges: dict[str, tuple[str, float]] = {
            "queue_depth": ("Jobs waiting in the queue.", queue.depth),
            "jobs_running": ("Jobs in the running batch.", len(queue.running)),
            "models_loaded": ("Pipelines in memory.", len(runners.loaded())),
            "ram_used_bytes": ("System RAM in use.", ram_used_bytes()),
            "process_rss_bytes": ("This process's resident memory.", psutil.Process().memory_info().rss),
            "images_stored": ("Images in the store.", images["count"]),
            "images_stored_bytes": ("Bytes of images in the store.", images["bytes"]),
        }
        for gpu in gpu_memory() or []:
            gauges[f"gpu{gpu['index']}_memory_used_bytes"] = (f"GPU {gpu['index']} memory in use.", gpu["used_bytes"])
        if runners.broker is not None:
            gauges["broker_queue_depth"] = ("Messages waiting in the broker.", runners.broker.ready)
            if runners.broker.consumers is not None:
                gauges["broker_consumers"] = ("Consumers of the broker's queue (RabbitMQ).", runners.broker.consumers)
        for name, (description, value) in gauges.items():
            yield GaugeMetricFamily(f"imagegen_{name}", description, value=value)
        # each model's loads, this process's or (in a cluster) every live worker's since it started
        reports = (
            runners.models
            if runners.workers is None
            else [info for worker in runners.workers if worker["alive"] for info in worker.get("models") or []]
        )
        yield from model_counts(reports)
        yield from queue_figures(self.jobs.queue_by_model(), self.jobs.db.now())
        if runners.workers is not None:  # a cluster: its workers, each by name
            yield from worker_figures(runners.workers)


def queue_figures(rows: list[Any], now: float) -> Iterator[Metric]:
    """The queue by model and priority class (`JobStore.queue_by_model`): what to scale each model's
    workers on, as its jobs and its oldest job's wait (docs/scaling.md)."""
    jobs = GaugeMetricFamily("imagegen_queue_jobs", "Queued jobs, by model and priority.", labels=["model", "priority"])
    oldest = GaugeMetricFamily(
        "imagegen_queue_oldest_wait_seconds",
        "How long the oldest queued job has waited, by model and priority.",
        labels=["model", "priority"],
    )
    for row in rows:
        labels = [row["model"] or "", PRIORITIES[row["priority"]]]
        jobs.add_metric(labels, row["jobs"])
        oldest.add_metric(labels, max(0.0, now - row["oldest"]))
    yield jobs
    yield oldest


MODEL_COUNTS = {
    "model_loads": ("loads", "Model loads, by model."),
    "model_switches": ("switches", "Model loads that first unloaded another model (MAX_LOADED_MODELS), by model."),
    "images_filtered": ("filtered", "Images the model's own safety checker flagged (SAFETY_CHECKER), by model."),
}


def model_counts(reports: list[dict[str, Any]]) -> Iterator[Metric]:
    """Loads and switches per model, summed over the reports that give them (a model's on each worker)."""
    for name, (key, description) in MODEL_COUNTS.items():
        family = CounterMetricFamily(f"imagegen_{name}", description, labels=["model"])
        totals: dict[str, int] = {}
        for info in reports:
            if key in info:
                totals[info["id"]] = totals.get(info["id"], 0) + info[key]
        for model, total in totals.items():
            family.add_metric([model], total)
        yield family


def loaded_models(models: list[dict[str, Any]]) -> list[str]:
    """The ids of the models in memory, from a queue's or a worker's description of its models."""
    return [model["id"] for model in models if model["state"] == ModelState.READY]


WORKER_GAUGES: dict[str, tuple[str, Callable[[dict[str, Any]], float | None]]] = {
    "up": ("1 while the worker's heartbeat is recent.", lambda w: w["alive"]),
    "jobs_done": ("Jobs the worker has run.", lambda w: w["jobs_done"]),
    "heartbeat_age_seconds": ("Seconds since the worker's heartbeat.", lambda w: w["heartbeat_age_seconds"]),
    "ram_used_bytes": ("RAM in use on the worker's machine.", lambda w: w.get("ram_used_bytes")),
    "process_rss_bytes": ("The worker process's resident memory.", lambda w: w.get("process_rss_bytes")),
    "models_loaded": ("Pipelines in the worker's memory.", lambda w: len(loaded_models(w.get("models") or []))),
}


def worker_figures(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    """Each worker's gauges and histograms, labelled with its name, from the reports in its heartbeats."""
    yield GaugeMetricFamily(
        "imagegen_workers_alive", "Cluster workers with a recent heartbeat.", value=sum(w["alive"] for w in workers)
    )
    for name, (description, read) in WORKER_GAUGES.items():
        family = GaugeMetricFamily(f"imagegen_worker_{name}", description, labels=["worker"])
        for worker in workers:
            if (value := read(worker)) is not None:
                family.add_metric([worker["name"]], value)
        yield family
    vram = GaugeMetricFamily(
        "imagegen_worker_gpu_memory_used_bytes", "GPU memory in use on the worker's GPUs.", labels=["worker", "gpu"]
    )
    for worker in workers:
        for gpu in worker.get("gpus") or []:
            vram.add_metric([worker["name"], str(gpu["index"])], gpu["used_bytes"])
    yield vram
    serves = GaugeMetricFamily(
        "imagegen_worker_serves", "1 for each model a live worker serves (WORKER_MODELS).", labels=["worker", "model"]
    )
    for worker in (worker for worker in workers if worker["alive"]):
        for model in worker.get("serves") or []:
            serves.add_metric([worker["name"], model], 1)
    yield serves
    for name, description in (
        ("generation_seconds", "Time of one pipeline call (a batch) on the worker."),
        ("batch_size", "Images per pipeline call on the worker."),
    ):
        family = HistogramMetricFamily(f"imagegen_worker_{name}", description, labels=["worker"])
        for worker in workers:
            if figures := worker.get(name):
                family.add_metric([worker["name"]], figures["buckets"], figures["sum"])
        yield family
