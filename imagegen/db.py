"""The SQL database that holds job, image and worker records: SQLite embedded, PostgreSQL in a cluster.

Why SQLAlchemy Core and Alembic: the same statements run on both databases, and the schema moves on
by numbered migrations that every process applies at start-up (under a lock on PostgreSQL, where
an API and its workers may start at once), so no one edits a table by hand.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# Any fixed number: the PostgreSQL advisory lock that lets one process at a time migrate.
MIGRATION_LOCK = 7_041_985

metadata = MetaData()


class db_now(FunctionElement):
    """The database's clock, in seconds since the epoch.

    Why the database's: API replicas and workers run on machines whose clocks differ, and a lease,
    a heartbeat or a TTL compared across two of them would judge a live worker lost (or a dead one
    alive) by the skew. Every cross-machine time is written and compared in SQL with this one clock.
    """

    type = Float()
    inherit_cache = True


@compiles(db_now, "postgresql")
def _postgres_now(_element: db_now, _compiler: Any, **_kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


@compiles(db_now, "sqlite")
def _sqlite_now(_element: db_now, _compiler: Any, **_kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("client", Text, nullable=False),
    Column("params", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("step", Integer, nullable=False, server_default="0"),
    Column("images", Text),
    Column("error", Text),
    Column("cache_key", String(64)),
    Column("callback_url", Text),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("worker", Text),
    Column("request_id", String(128)),  # X-Request-ID of the request that created the job (logs.job_context)
    # A running job belongs to its worker until then (database clock), renewed by its progress and
    # its worker's heartbeat; after it, another worker may take the job over (jobs.JobStore.claim).
    Column("lease_until", Float, nullable=False, server_default="0"),
    # When a queued job was last handed to the broker; the reconciler publishes again one it forgot.
    Column("published_at", Float),
    # The Idempotency-Key its request carried, and what the request was (api.submission.fingerprint): a
    # repeat by the same client within a day returns this job (one per client and key).
    Column("idempotency_key", String(255)),
    Column("fingerprint", String(64)),
    # What its run changed of the request without refusing it (engine/prompts.cut), shown with its result.
    Column("warnings", Text),
    # The step of its latest preview (0: none yet), stored by its worker as storage.ImageStore.save_preview.
    Column("preview_step", Integer, nullable=False, server_default="0"),
    # Its model (also in `params`) and priority class (an index of config.PRIORITIES): what a
    # worker's broker message lets it take, in the scheduling policy's order, and what /metrics
    # counts the queue by.
    Column("model", Text),
    Column("priority", Integer, nullable=False, server_default="1"),
    Index("ix_jobs_idempotency", "client", "idempotency_key", unique=True),
    Index("ix_jobs_waiting", "status", "model"),
)

images = Table(
    "images",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("job_id", String(32)),
    Column("created_at", Float, nullable=False),
    Column("bytes", Integer, nullable=False),
)

# Uploaded images and masks of edits, named by their content (the same upload is stored once).
inputs = Table(
    "inputs",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),  # the last time a request stored it
    Column("bytes", Integer, nullable=False),
)

# The webhook outbox: one delivery per job that gave a callback URL, written as the job ends.
webhooks = Table(
    "webhooks",
    metadata,
    Column("job_id", String(32), primary_key=True),
    Column("url", Text, nullable=False),
    Column("status", String(16), nullable=False),  # pending, delivered, failed
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text),
    Column("next_at", Float, nullable=False),  # due from then on
    Column("lease_until", Float, nullable=False, server_default="0"),  # a sender holds it until then
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float),
)

workers = Table(
    "workers",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("device", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("jobs_done", Integer, nullable=False, server_default="0"),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("report", Text),  # JSON: the worker's memory, GPUs, models and histograms (monitoring.runner_report)
)

# What an admin changed at run time (PATCH /admin/settings, A1111's /options), read by every process.
runtime_settings = Table(
    "runtime_settings",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("value", Text, nullable=False),  # JSON
    Column("updated_at", Float, nullable=False),
)

# One row, made by the migration that created the table: which database this is (`Database.identity`).
identity = Table("identity", metadata, Column("id", String(32), primary_key=True))


class Deadlines:
    """Cuts the socket of a PostgreSQL call that outlives DATABASE_TIMEOUT_SECONDS.

    Why our own: a server that accepts and never answers (a frozen host or container, a stuck
    proxy) is beyond every libpq timeout. `statement_timeout` runs on the server, and the kernel
    still acknowledges what keepalives and `tcp_user_timeout` send, so a request would wait as long
    as the server stays frozen, holding a server thread. psycopg waits on the socket; shutting the
    socket down from this thread ends the wait with an OperationalError, SQLAlchemy drops the
    connection, and the request answers 503 `database_unavailable`. One thread serves every engine.
    """

    TICK_SECONDS = 0.1

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[float, int]] = {}  # id(psycopg connection) -> (deadline, socket)
        self._thread: threading.Thread | None = None

    def arm(self, connection: Any, seconds: float) -> None:
        pgconn = getattr(connection, "pgconn", None)  # psycopg's (other drivers are not watched)
        if pgconn is None or pgconn.socket < 0:
            return
        with self._lock:
            self._armed[id(connection)] = (time.monotonic() + seconds, pgconn.socket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="db-deadlines", daemon=True)
                self._thread.start()

    def disarm(self, connection: Any) -> None:
        with self._lock:
            self._armed.pop(id(connection), None)

    def _watch(self) -> None:
        while True:
            time.sleep(self.TICK_SECONDS)
            now = time.monotonic()
            with self._lock:
                late = [key for key, (deadline, _fd) in self._armed.items() if deadline <= now]
                for key in late:
                    _deadline, fd = self._armed.pop(key)
                    try:  # a duplicate of the descriptor: shutdown acts on the socket, close on the copy
                        with socket.socket(fileno=socket.dup(fd)) as sock:
                            sock.shutdown(socket.SHUT_RDWR)
                    except OSError:  # closed meanwhile
                        pass
            if late:
                log.warning(
                    "%d database calls outlived DATABASE_TIMEOUT_SECONDS; their connections were cut", len(late)
                )


DEADLINES = Deadlines()


class Database:
    """An engine on DATABASE_URL, brought to the newest schema when opened.

    On PostgreSQL every call has a bound (`timeout`, DATABASE_TIMEOUT_SECONDS): to connect, to wait
    for a pooled connection, for a statement on the server, for a dead peer (TCP keepalive and user
    timeout), and for a server that stops answering (`Deadlines`)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parsed = make_url(url)
        sqlite = parsed.get_backend_name() == "sqlite"
        if sqlite:
            if parsed.database:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            connect = {"timeout": 30, "check_same_thread": False}
            self.engine = create_engine(url, pool_pre_ping=True, connect_args=connect)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:  # PostgreSQL
            seconds, milliseconds = max(2, math.ceil(timeout)), int(timeout * 1000)
            connect = {
                "connect_timeout": seconds,
                "options": f"-c statement_timeout={milliseconds}",
                "keepalives": 1,
                "keepalives_idle": seconds,
                "keepalives_interval": 1,
                "keepalives_count": 3,
                "tcp_user_timeout": milliseconds,
            }
            self.engine = create_engine(url, pool_size=10, max_overflow=20, pool_timeout=timeout, connect_args=connect)
            self._bound_every_call(timeout)
        self.url = parsed.render_as_string(hide_password=True)
        # An embedded SQLite file's folder, whose disk /health and /status watch; None for a server.
        self.local_dir = Path(parsed.database).resolve().parent if sqlite and parsed.database else None
        self._migrate()

    def _bound_every_call(self, seconds: float) -> None:
        """Arms a deadline around each round trip: statements, commits, the rollback that resets a
        returned connection, and the ping at checkout (ours, since SQLAlchemy's pre-ping has no
        event before it; a failed ping asks the pool for a fresh connection)."""

        def arm(connection: Connection, *_args: Any) -> None:
            if not connection.info.get("unbounded"):
                DEADLINES.arm(_raw(connection), seconds)

        def disarm(connection: Connection | None, *_args: Any) -> None:
            DEADLINES.disarm(_raw(connection))

        def arm_raw(dbapi_connection: Any, *_args: Any) -> None:
            DEADLINES.arm(dbapi_connection, seconds)

        def disarm_raw(dbapi_connection: Any, *_args: Any) -> None:
            DEADLINES.disarm(dbapi_connection)

        def ping(dbapi_connection: Any, *_args: Any) -> None:
            DEADLINES.arm(dbapi_connection, seconds)
            try:
                with dbapi_connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
            except Exception as exc:
                raise DisconnectionError(str(exc)) from exc
            finally:
                DEADLINES.disarm(dbapi_connection)

        event.listen(self.engine, "before_cursor_execute", arm)
        event.listen(self.engine, "after_cursor_execute", disarm)
        event.listen(self.engine, "handle_error", lambda context: disarm(context.connection))
        event.listen(self.engine, "commit", arm)
        event.listen(self.engine, "rollback", arm)
        event.listen(self.engine.pool, "checkout", ping)
        event.listen(self.engine.pool, "reset", arm_raw)
        for name in ("checkin", "invalidate", "close"):
            event.listen(self.engine.pool, name, disarm_raw)

    def _migrate(self) -> None:
        """Applies every migration this database lacks, one process at a time."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.connect() as conn:
            postgres = conn.dialect.name == "postgresql"
            conn.info["unbounded"] = postgres  # the lock waits for another process's migration, however long
            try:
                with conn.begin():
                    if postgres:
                        conn.execute(text("SET LOCAL statement_timeout = 0"))
                        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
                    config.attributes["connection"] = conn
                    command.upgrade(config, "head")
            finally:
                conn.info.pop("unbounded", None)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self.engine.begin() as conn:
            yield conn

    def query(self, statement: Any, args: dict[str, Any] | None = None) -> list[Any]:
        """Rows of one read."""
        with self.engine.connect() as conn:
            return list(conn.execute(statement, args or {}).mappings())

    def now(self) -> float:
        """The database's clock (`db_now`), for a time that another machine will compare."""
        return float(self.query(select(db_now().label("now")))[0]["now"])

    def identity(self) -> str:
        """This database's id, random and made once: what an image store records as its owner."""
        return str(self.query(select(identity.c.id))[0]["id"])

    def ping(self) -> None:
        """Raises when the database does not answer."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def close(self) -> None:
        """Closes the pooled connections (the engine opens new ones if it is used again)."""
        self.engine.dispose()


def _raw(connection: Connection | None) -> Any:
    """The driver's connection under SQLAlchemy's, or None (none, or invalidated meanwhile)."""
    try:
        return connection.connection.dbapi_connection if connection is not None else None
    except Exception:
        return None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL so readers never wait for the worker's writes; FULL sync so that a job answered 202 is
    on disk when the answer leaves (NORMAL, WAL's usual partner, may lose the last commits to a
    power cut; FULL costs one fsync per commit)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()
