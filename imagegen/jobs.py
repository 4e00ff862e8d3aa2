"""Job records: what was asked, where it stands, what it made. The SQL record is the one truth about a job.

Why a store and not objects in memory: a job outlives the request that made it (async clients
poll it, a restart or a dead worker runs it again), and every reader (routes on any API replica,
the workers, /status) sees one record: state, queue position, progress, cancel request, images.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any, NamedTuple

from sqlalchemy import and_, case, delete, func, insert, literal, or_, select, update

from config import PRIORITIES
from imagegen.db import Database, db_now, webhooks
from imagegen.db import jobs as table
from imagegen.schedulers import AUTOMATIC

NORMAL = PRIORITIES.index("normal")


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


class WebhookStatus(StrEnum):
    WAITING = "waiting"  # the job has not ended yet
    PENDING = "pending"  # in the outbox, due now or after a backoff
    DELIVERED = "delivered"
    FAILED = "failed"  # given up: WEBHOOK_RETRIES spent, or a redirect
    TIMED_OUT = "timed_out"  # given up, its last attempt unanswered in time (the receiver may have acted on it)


# An edit's own fields, left out of a text-to-image job's `parameters` (they would say nothing there);
# so are an upscale's own fields but for an upscale, and hires fix's but for a job that has it.
EDIT_FIELDS = ("image", "mask", "strength", "mask_blur", "mask_crop_padding", "steps_run")
UPSCALE_FIELDS = ("upscaler_2", "upscaler_2_visibility", "upscale_crop")
HIRES_FIELDS = (
    "hires_width",
    "hires_height",
    "hires_steps",
    "hires_strength",
    "hires_steps_run",
    "hires_prompt",
    "hires_negative_prompt",
)
OPTIONAL_FIELDS = (*EDIT_FIELDS, *UPSCALE_FIELDS, *HIRES_FIELDS, "upscaler")


class Control(NamedTuple):
    """One ControlNet of a job: its name, its control map (preprocessed and stored before the job
    was accepted, at the output size; for a network preprocessor, the image it maps, which the
    worker maps), its weight, and the share of the steps it acts in."""

    model: str
    image: str
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocessor: str = "none"  # what made the map (a network's is made by the worker)


class Reference(NamedTuple):
    """One IP-Adapter of a job: its name, the image it is shown (stored with the job) and its scale."""

    model: str
    image: str
    scale: float = 1.0


@dataclass(frozen=True)
class GenerationParams:
    """Everything the engine needs for one job, fully resolved (defaults applied, seeds drawn)."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    scheduler: str
    model: str
    prompt_2: str = ""  # for the second text encoder of the families that have one (families.py)
    mode: str = "txt2img"  # or img2img, variation, inpaint, outpaint (families.Family.modes), upscale, detect
    image: str = ""  # an edit's image, stored before the job was accepted (ImageStore.save_input)
    mask: str = ""  # an inpainting's or outpainting's mask (white = repaint), stored the same way
    strength: float = 1.0  # how far an edit departs from its image (1: repainted from noise)
    mask_blur: int = 0  # pixels the mask's edge is feathered inward
    mask_crop_padding: int | None = None  # paint only the mask's box and this margin, scaled up (edits.crop_box)
    steps_run: int = 0  # the denoising steps an edit runs at its strength (0: all `steps`)
    loras: tuple[tuple[str, float], ...] = ()  # LoRA adapters by name, with their weights
    noise_schedule: str = AUTOMATIC  # the scheduler's sigmas (schedulers.SCHEDULES)
    prompt_syntax: str = "a1111"  # A1111's weights and BREAK in the prompts, or "none": plain text
    embeddings: tuple[tuple[str, str], ...] = ()  # the textual-inversion embeddings its prompts name, with versions
    clip_skip: int = 1  # the text encoder's hidden state this many layers from its end (1: the last)
    eta: float | None = None  # DDIM's eta (None: the scheduler's own, 0)
    subseeds: tuple[int, ...] = ()  # variation seeds, one per image (empty: none)
    subseed_strength: float = 0.0
    seed_resize_from_width: int = 0  # the seed's noise drawn at this size (0: the image's)
    seed_resize_from_height: int = 0
    tiling: bool = False  # images that tile: circular padding in the denoiser's and the VAE's convolutions
    # Upscaling: an upscale job's upscaler (upscalers.py), or hires fix's; A1111 extras' second one,
    # blended in at its visibility; an upscale to a size of another aspect covers it, then is cropped.
    upscaler: str = ""
    upscaler_2: str = ""
    upscaler_2_visibility: float = 0.0
    upscale_crop: bool = False
    # Hires fix: the final size (0: none; width and height are the first pass's), and its second
    # pass's steps (0: the first pass's), denoising strength, steps run and prompts (empty: the first's).
    hires_width: int = 0
    hires_height: int = 0
    hires_steps: int = 0
    hires_strength: float = 0.0
    hires_steps_run: int = 0
    hires_prompt: str = ""
    hires_negative_prompt: str = ""
    control: tuple[Control, ...] = ()  # ControlNets (several: multi-ControlNet), in the request's order
    ip_adapter: tuple[Reference, ...] = ()  # IP-Adapters with their reference images
    preview_every: int = 0  # a preview of the image forming every this many steps (0: none); not batched on
    output_format: str = "png"  # how its images are stored: png, jpeg or webp (storage.FORMATS)
    quality: int = 0  # a jpeg's or webp's quality (0: storage.DEFAULT_QUALITY)
    step_cache: str = "none"  # how much of a step reuses the steps before (engine/caching.py)

    @property
    def output_size(self) -> tuple[int, int]:
        """Its images' size: hires fix's final one where it has one, else width x height."""
        return (self.hires_width, self.hires_height) if self.hires_width else (self.width, self.height)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The stored inputs it reads (empty where it has none): an edit's image and mask, then its
        ControlNets' maps and its IP-Adapters' images, in order."""
        references = (each.image for each in self.ip_adapter)
        return (self.image, self.mask, *(unit.image for unit in self.control), *references)

    @property
    def total_steps(self) -> int:
        """The steps the pipelines run (hires fix's second pass too), which progress counts."""
        return (self.steps_run or self.steps) + self.hires_steps_run

    def passes(self) -> list[GenerationParams]:
        """What each pipeline pass reads its prompts from: the job's own, then with hires fix its
        second pass's (the first pass's prompts where it has none of its own)."""
        if not self.hires_width:
            return [self]
        second = replace(
            self,
            prompt=self.hires_prompt or self.prompt,
            negative_prompt=self.hires_negative_prompt or self.negative_prompt,
        )
        return [self, second]

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one pipeline call; prompts, seeds and an edit's images may
        differ."""
        return (
            self.model,
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.scheduler,
            self.mode,
            self.strength,
            self.mask_blur,
            self.mask_crop_padding,
            self.loras,
            self.noise_schedule,
            self.clip_skip,
            self.eta,
            self.subseed_strength,
            self.seed_resize_from_width,
            self.seed_resize_from_height,
            self.tiling,
            self.upscaler,
            self.upscaler_2,
            self.upscaler_2_visibility,
            self.upscale_crop,
            self.hires_width,
            self.hires_height,
            self.hires_steps,
            self.hires_strength,
            tuple(unit[:1] + unit[2:5] for unit in self.control),  # the control maps may differ
            self.ip_adapter,  # a pipeline call shows every image one reference image per IP-Adapter
            self.step_cache,
        )

    @property
    def digest(self) -> str:
        """Identifies the exact request (seeds included), for the result cache."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def view(self) -> dict[str, Any]:
        """The fields as a job's `parameters` show them (the response schema is made from the same
        fields): `loras` in the request's shape, an edit's, an upscale's and hires fix's own fields
        only where they say something, and the image count."""
        fields = {
            **asdict(self),
            "loras": self.lora_view(),
            "control": [unit._asdict() for unit in self.control],
            "ip_adapter": [reference._asdict() for reference in self.ip_adapter],
        }
        hidden = {
            *(EDIT_FIELDS if self.mode in ("txt2img", "detect") else ()),
            *(UPSCALE_FIELDS if self.mode != "upscale" else ()),
            *(HIRES_FIELDS if not self.hires_width else ()),
            *(("upscaler",) if self.mode != "upscale" and not self.hires_width else ()),
        }
        for name in hidden:
            del fields[name]
        return {**fields, "seeds": list(self.seeds), "subseeds": list(self.subseeds), "num_images": len(self.seeds)}

    def lora_view(self) -> list[dict[str, Any]]:
        return [{"name": name, "weight": weight} for name, weight in self.loras]

    def image_metadata(self, index: int) -> dict[str, Any]:
        """What the job's `index`th PNG records about how it was made: the fields its job's
        `parameters` show, with its own seed (and variation seed) for the lists of them."""
        fields = self.view()
        del fields["seeds"], fields["subseeds"], fields["num_images"]
        subseed = {"subseed": self.subseeds[index]} if self.subseeds else {}
        return {**fields, "seed": self.seeds[index], **subseed}


@dataclass(frozen=True)
class Lease:
    """Which worker runs a job, on which attempt: the guard of every write that worker makes about
    it, so a worker that lost the job (its lease ran out while it hung, and another took over)
    changes nothing when it wakes."""

    worker: str
    attempt: int


@dataclass
class Job:
    """One generation request and its lifecycle."""

    params: GenerationParams
    client: str = ""
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    images: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    cache_key: str | None = None
    callback_url: str | None = None
    attempts: int = 0
    worker: str | None = None
    request_id: str | None = None
    webhook: dict[str, Any] | None = None  # {status, attempts, last_error} of its callback, if it gave one
    idempotency_key: str | None = None
    fingerprint: str | None = None
    warnings: list[str] = field(default_factory=list)  # what its run changed of the request, without refusing it
    preview_step: int = 0  # the step of its latest preview (0: none yet)
    priority: int = NORMAL  # its class, an index of config.PRIORITIES: higher runs first

    def __post_init__(self) -> None:
        if self.callback_url and self.webhook is None:  # nothing in the outbox until the job ends
            self.webhook = {"status": WebhookStatus.WAITING, "attempts": 0, "last_error": None}

    @property
    def lease(self) -> Lease | None:
        """The lease this record was read under, if it is running."""
        return Lease(self.worker, self.attempts) if self.status == JobStatus.RUNNING and self.worker else None

    @property
    def progress(self) -> float:
        return 1.0 if self.status == JobStatus.SUCCEEDED else self.step / self.params.total_steps

    def timings(self) -> dict[str, float | None]:
        """Seconds queued, generating and in all, once each span has ended."""

        def span(start: float | None, end: float | None) -> float | None:
            return round(end - start, 4) if start is not None and end is not None else None

        return {
            "queue_seconds": span(self.created_at, self.started_at),
            "generation_seconds": span(self.started_at, self.finished_at),
            "total_seconds": span(self.created_at, self.finished_at),
        }


def _row_to_job(row: Any) -> Job:
    params = json.loads(row["params"])
    params["seeds"] = tuple(params["seeds"])
    params["subseeds"] = tuple(params.get("subseeds", ()))
    params["embeddings"] = tuple(tuple(pair) for pair in params.get("embeddings", ()))
    params["loras"] = tuple(tuple(lora) for lora in params.get("loras", ()))
    params["control"] = tuple(Control(*unit) for unit in params.get("control", ()))
    params["ip_adapter"] = tuple(Reference(*reference) for reference in params.get("ip_adapter", ()))
    return Job(
        params=GenerationParams(**params),
        client=row["client"],
        id=row["id"],
        status=JobStatus(row["status"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        step=row["step"],
        images=json.loads(row["images"] or "[]"),
        error=json.loads(row["error"]) if row["error"] else None,
        cache_key=row["cache_key"],
        callback_url=row["callback_url"],
        attempts=row["attempts"],
        worker=row["worker"],
        request_id=row["request_id"],
        idempotency_key=row["idempotency_key"],
        fingerprint=row["fingerprint"],
        warnings=json.loads(row["warnings"] or "[]"),
        preview_step=row["preview_step"],
        priority=row["priority"],
        webhook=(
            {"status": row["webhook_status"], "attempts": row["webhook_attempts"], "last_error": row["webhook_error"]}
            if row["webhook_status"]
            else None
        ),
    )


# Every read of a job: its record with its webhook delivery's state, if the job has one yet.
JOBS = select(
    table,
    webhooks.c.status.label("webhook_status"),
    webhooks.c.attempts.label("webhook_attempts"),
    webhooks.c.last_error.label("webhook_error"),
).select_from(table.outerjoin(webhooks, webhooks.c.job_id == table.c.id))

UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


def _under(worker: str | None, attempt: int) -> Any:
    """Rows still running under that lease: its worker, its attempt."""
    return and_(table.c.status == JobStatus.RUNNING, table.c.worker == worker, table.c.attempts == attempt)


def _held(jobs: list[Job]) -> Any:
    """The rows of these jobs still running under the lease each was read with (`Job.lease`)."""
    return or_(*(and_(table.c.id == job.id, _under(job.worker, job.attempts)) for job in jobs))


class JobStore:
    """Creates, reads and moves jobs through their states; every change is one conditional UPDATE,
    so concurrent writers (API replicas, workers) can never end a job twice."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, job: Job) -> Job:
        """Records a new queued job, stamped by the database's clock (queue order across replicas);
        it counts as published from now: the caller publishes it next."""
        with self.db.transaction() as conn:
            job.created_at = conn.execute(
                insert(table)
                .values(
                    id=job.id,
                    status=job.status,
                    client=job.client,
                    params=json.dumps(asdict(job.params)),
                    model=job.params.model,
                    priority=job.priority,
                    created_at=db_now(),
                    published_at=db_now(),
                    cache_key=job.cache_key,
                    callback_url=job.callback_url,
                    request_id=job.request_id,
                    idempotency_key=job.idempotency_key,
                    fingerprint=job.fingerprint,
                )
                .returning(table.c.created_at)
            ).scalar_one()
        return job

    def get(self, job_id: str) -> Job | None:
        rows = self.db.query(JOBS.where(table.c.id == job_id))
        return _row_to_job(rows[0]) if rows else None

    def many(self, job_ids: list[str]) -> list[Job]:
        """The jobs of these ids that exist, in the order given."""
        found = {row["id"]: _row_to_job(row) for row in self.db.query(JOBS.where(table.c.id.in_(job_ids)))}
        return [found[job_id] for job_id in job_ids if job_id in found]

    def claim(
        self,
        job_ids: list[str],
        worker: str,
        lease_seconds: float,
        take_over: bool = False,
        refund: Collection[str] = (),
    ) -> list[Job]:
        """Marks these jobs running on `worker` under a lease of `lease_seconds` and counts the
        attempt; returns those it claimed. A job of `refund` still running on `worker` is not counted
        again: its last attempt was cut short by an outage that also refused to put it back (a full
        disk refuses every write), and outages cost no attempt.

        A job already ended is left alone, so a redelivered message never runs it again; so is a job
        running under a live lease (its worker is computing it: a redelivery after a broker
        connection dropped must not start a second run). A job whose lease ran out (its worker died
        or hung) is taken over. `take_over` takes any unfinished job: local mode's one process
        (DATA_DIR is locked) owns every job it finds.
        """
        now = db_now()
        free = (
            table.c.status.in_(UNFINISHED)
            if take_over
            else or_(table.c.status == JobStatus.QUEUED, table.c.lease_until < now)
        )
        attempts: Any = table.c.attempts + 1
        if refund:
            owed = and_(table.c.id.in_(list(refund)), table.c.status == JobStatus.RUNNING, table.c.worker == worker)
            attempts = case((owed, table.c.attempts), else_=attempts)
        with self.db.transaction() as conn:
            claimed = conn.execute(
                update(table)
                .where(table.c.id.in_(job_ids), table.c.status.in_(UNFINISHED), free)
                .values(
                    status=JobStatus.RUNNING,
                    started_at=now,
                    step=0,
                    preview_step=0,
                    attempts=attempts,
                    worker=worker,
                    lease_until=now + lease_seconds,
                )
                .returning(table.c.id)
            ).scalars()
            taken = set(claimed)
        return [job for job in self.many(job_ids) if job.id in taken and job.status == JobStatus.RUNNING]

    def release(self, job: Job, counted: bool = True, after: float = 0) -> bool:
        """Puts a job back in the queue to run again `after` seconds from now, if its lease
        (`job.lease`) still holds it; an attempt cut short by an outage (the database, the storage)
        is not `counted`. Its message is due then: the reconciler waits that long before it takes
        the job for forgotten."""
        values: dict[str, Any] = {"published_at": db_now() + after}
        if not counted:
            values["attempts"] = table.c.attempts - 1
        return self._requeue(_held([job]), values)

    def expired(self) -> list[Job]:
        """Running jobs whose lease has run out: their worker died, hung or lost the database."""
        rows = self.db.query(JOBS.where(table.c.status == JobStatus.RUNNING, table.c.lease_until < db_now()))
        return [_row_to_job(row) for row in rows]

    def recover(self, job: Job) -> bool:
        """Queues again a job whose lease ran out (`expired`), unless its worker renewed it since or
        another reconciler took it first; the attempt counts (JOB_MAX_RETRIES ends a job that keeps
        killing its workers)."""
        return self._requeue(and_(_held([job]), table.c.lease_until < db_now()), {"published_at": db_now()})

    def _requeue(self, condition: Any, values: dict[str, Any]) -> bool:
        with self.db.transaction() as conn:
            return bool(
                conn.execute(
                    update(table)
                    .where(condition)
                    .values(
                        status=JobStatus.QUEUED,
                        started_at=None,
                        step=0,
                        preview_step=0,
                        worker=None,
                        lease_until=0,
                        **values,
                    )
                ).rowcount
            )

    def set_step(self, jobs: list[Job], step: int, lease_seconds: float, previews: dict[str, int] | None = None) -> int:
        """Records progress (and the steps of the previews stored since, by job id) and renews the
        jobs' leases; returns how many are still running under their leases (not cancelled, not
        taken over)."""
        if previews:
            shown = case(previews, value=table.c.id, else_=table.c.preview_step)
            return self._touch(jobs, lease_seconds, step=step, preview_step=shown)
        return self._touch(jobs, lease_seconds, step=step)

    def renew(self, jobs: list[Job], lease_seconds: float) -> int:
        """Renews the leases of jobs whose batch is alive but between steps (a model load, a long
        step); how many it still holds."""
        return self._touch(jobs, lease_seconds)

    def _touch(self, jobs: list[Job], lease_seconds: float, **values: Any) -> int:
        if not jobs:
            return 0
        with self.db.transaction() as conn:
            return conn.execute(
                update(table).where(_held(jobs)).values(lease_until=db_now() + lease_seconds, **values)
            ).rowcount

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        images: list[dict[str, Any]] | None = None,
        error: dict[str, Any] | None = None,
        lease: Lease | None = None,
        warnings: list[str] | None = None,
    ) -> bool:
        """Ends a job once; a job already finished keeps its first outcome (and this returns False),
        and so does one whose `lease` (a worker's) no longer holds it. The ending and its webhook
        delivery (if the job gave a callback URL) commit together."""
        ending = table.c.status.in_(UNFINISHED) if lease is None else _under(lease.worker, lease.attempt)
        with self.db.transaction() as conn:
            now = conn.execute(select(db_now())).scalar_one()
            changed = conn.execute(
                update(table)
                .where(table.c.id == job_id, ending)
                .values(
                    status=status,
                    finished_at=now,
                    lease_until=0,
                    images=json.dumps(images or []),
                    error=json.dumps(error) if error else None,
                    warnings=json.dumps(warnings) if warnings else None,
                )
            ).rowcount
            if changed:
                pending, at = literal(WebhookStatus.PENDING.value), literal(now)
                outbox = select(table.c.id, table.c.callback_url, pending, at, at)
                conn.execute(
                    insert(webhooks).from_select(
                        ["job_id", "url", "status", "next_at", "created_at"],
                        outbox.where(table.c.id == job_id, table.c.callback_url.is_not(None)),
                    )
                )
        return bool(changed)

    # ----- the webhook outbox: a row per delivery, written by `finish` with its job's ending -----
    def take_deliveries(self, limit: int, lease_seconds: float) -> list[str]:
        """The job ids of up to `limit` due deliveries, each taken for this process by a lease on its
        row (and its attempt counted), so senders on several machines take turns by one clock."""
        now = self.db.now()
        due = self.db.query(
            select(webhooks.c.job_id)
            .where(webhooks.c.status == WebhookStatus.PENDING, webhooks.c.next_at <= now, webhooks.c.lease_until <= now)
            .order_by(webhooks.c.next_at)
            .limit(limit)
        )
        taken = []
        for row in due:
            with self.db.transaction() as conn:
                if conn.execute(
                    update(webhooks)
                    .where(
                        webhooks.c.job_id == row["job_id"],
                        webhooks.c.status == WebhookStatus.PENDING,
                        webhooks.c.lease_until <= now,
                    )
                    .values(lease_until=now + lease_seconds, attempts=webhooks.c.attempts + 1)
                ).rowcount:
                    taken.append(row["job_id"])
        return taken

    def record_delivery(self, job_id: str, status: WebhookStatus, error: str | None, retry_after: float) -> None:
        """A delivery attempt's outcome; a pending one is due again `retry_after` seconds from now."""
        now = db_now()
        with self.db.transaction() as conn:
            conn.execute(
                update(webhooks)
                .where(webhooks.c.job_id == job_id, webhooks.c.status == WebhookStatus.PENDING)
                .values(
                    status=status,
                    last_error=error,
                    lease_until=0,
                    next_at=now + retry_after,
                    finished_at=None if status == WebhookStatus.PENDING else now,
                )
            )

    def due_for_publish(self, older_than: float, limit: int, model: str) -> list[str]:
        """The oldest queued jobs of a model (at most `limit`) not handed to the broker for
        `older_than` seconds, each marked published now by this call alone: reconcilers on several
        replicas at once never publish one job twice."""
        now = db_now()
        stale = and_(
            table.c.status == JobStatus.QUEUED,
            table.c.model == model,
            or_(table.c.published_at.is_(None), table.c.published_at < now - older_than),
        )
        oldest = select(table.c.id).where(stale).order_by(table.c.created_at).limit(limit)
        with self.db.transaction() as conn:
            return list(
                conn.execute(
                    update(table).where(table.c.id.in_(oldest), stale).values(published_at=now).returning(table.c.id)
                ).scalars()
            )

    def held(self, jobs: list[Job]) -> set[str]:
        """The ids of these jobs still running under the leases they were claimed with (not
        cancelled, not taken over)."""
        return {row["id"] for row in self.db.query(select(table.c.id).where(_held(jobs)))} if jobs else set()

    def recent(self, client: str | None = None, status: JobStatus | None = None, limit: int = 50) -> list[Job]:
        """Newest first, optionally only one client's or one status's."""
        query = JOBS
        if client is not None:
            query = query.where(table.c.client == client)
        if status is not None:
            query = query.where(table.c.status == status)
        rows = self.db.query(query.order_by(table.c.created_at.desc()).limit(limit))
        return [_row_to_job(row) for row in rows]

    def cached(self, cache_key: str, client: str, fresh_for: float) -> Job | None:
        """The newest succeeded job of this client made from exactly these parameters (a cache per
        owner: another client never receives this one's job, timings or image links), ended less than
        `fresh_for` seconds ago: a hit whose images expire a moment later is no hit."""
        rows = self.db.query(
            JOBS.where(
                table.c.cache_key == cache_key,
                table.c.client == client,
                table.c.status == JobStatus.SUCCEEDED,
                table.c.finished_at > db_now() - fresh_for,
            )
            .order_by(table.c.created_at.desc())
            .limit(1)
        )
        return _row_to_job(rows[0]) if rows else None

    def keyed(self, client: str, key: str, within: float) -> Job | None:
        """The job this client made with this Idempotency-Key less than `within` seconds ago. An older
        one gives its key up first, so the key makes a new job (one job per client and key)."""
        with self.db.transaction() as conn:
            conn.execute(
                update(table)
                .where(
                    table.c.client == client,
                    table.c.idempotency_key == key,
                    table.c.created_at <= db_now() - within,
                )
                .values(idempotency_key=None)
            )
        rows = self.db.query(JOBS.where(table.c.client == client, table.c.idempotency_key == key))
        return _row_to_job(rows[0]) if rows else None

    def delete_finished_older_than(self, seconds: float) -> int:
        """Forgets jobs that ended more than `seconds` ago (their images have expired by then), and
        their webhook deliveries."""
        with self.db.transaction() as conn:
            cutoff = conn.execute(select(db_now())).scalar_one() - seconds
            forgotten = conn.execute(
                delete(table).where(table.c.finished_at < cutoff, table.c.status.not_in(UNFINISHED))
            ).rowcount
            conn.execute(delete(webhooks).where(webhooks.c.created_at < cutoff))  # made as its job ended
            return forgotten

    def unfinished(self) -> list[Job]:
        """Jobs accepted but not ended, oldest first (a restarted local server queues them again)."""
        rows = self.db.query(JOBS.where(table.c.status.in_(UNFINISHED)).order_by(table.c.created_at))
        return [_row_to_job(row) for row in rows]

    def running(self) -> list[Job]:
        """Jobs some worker is running now, oldest first."""
        rows = self.db.query(JOBS.where(table.c.status == JobStatus.RUNNING).order_by(table.c.created_at))
        return [_row_to_job(row) for row in rows]

    def queued(self) -> list[Job]:
        """Every queued job, oldest first (a job's place in the queue is the scheduling policy's)."""
        rows = self.db.query(JOBS.where(table.c.status == JobStatus.QUEUED).order_by(table.c.created_at))
        return [_row_to_job(row) for row in rows]

    def waiting(self, model: str, limit: int) -> list[Job]:
        """The oldest `limit` queued jobs of a model that may run now (a retried job waits out its
        pause: its message is due then), oldest first: what a worker's messages for that model
        let it choose from."""
        due = or_(table.c.published_at.is_(None), table.c.published_at <= db_now())
        query = JOBS.where(table.c.status == JobStatus.QUEUED, table.c.model == model, due)
        return [_row_to_job(row) for row in self.db.query(query.order_by(table.c.created_at).limit(limit))]

    def queue_by_model(self) -> list[dict[str, Any]]:
        """The queue by model and priority class: how many jobs wait, and since when the oldest."""
        query = (
            select(
                table.c.model,
                table.c.priority,
                func.count().label("jobs"),
                func.min(table.c.created_at).label("oldest"),
            )
            .where(table.c.status == JobStatus.QUEUED)
            .group_by(table.c.model, table.c.priority)
        )
        return self.db.query(query)

    def recent_generation_seconds(self, last: int = 10) -> float | None:
        """Mean time from start to end of the last succeeded jobs (in a cluster, on any worker)."""
        rows = self.db.query(
            select((table.c.finished_at - table.c.started_at).label("seconds"))
            .where(table.c.status == JobStatus.SUCCEEDED, table.c.started_at.is_not(None))
            .order_by(table.c.finished_at.desc())
            .limit(last)
        )
        return sum(row["seconds"] for row in rows) / len(rows) if rows else None

    def depth(self, client: str | None = None) -> int:
        """Jobs queued and not yet started across the whole cluster, or one client's (MAX_JOBS_PER_CLIENT)."""
        return self._queued() if client is None else self._queued(table.c.client == client)

    def _queued(self, *conditions: Any) -> int:
        """How many queued jobs meet the conditions."""
        query = select(func.count().label("n")).select_from(table).where(table.c.status == JobStatus.QUEUED)
        return self.db.query(query.where(*conditions))[0]["n"]
