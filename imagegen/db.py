"""The embedded SQLite database that holds job and image records under DATA_DIR.

Why a module of its own: the job store and the image store share one file and one connection
policy (a connection per thread, WAL so readers never wait for the worker's writes).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Each entry moves the schema one version on (PRAGMA user_version); never edit a shipped entry.
MIGRATIONS = (
    """
    CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        client TEXT NOT NULL,
        params TEXT NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        step INTEGER NOT NULL DEFAULT 0,
        images TEXT,
        error TEXT
    );
    CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at);
    CREATE TABLE IF NOT EXISTS images (
        name TEXT PRIMARY KEY,
        job_id TEXT,
        created_at REAL NOT NULL,
        bytes INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS images_created ON images (created_at);
    """,
    """
    ALTER TABLE jobs ADD COLUMN cache_key TEXT;
    ALTER TABLE jobs ADD COLUMN callback_url TEXT;
    CREATE INDEX IF NOT EXISTS jobs_client ON jobs (client, created_at);
    CREATE INDEX IF NOT EXISTS jobs_cache ON jobs (cache_key, status);
    """,
)


class Database:
    """A SQLite file with one connection per thread; `transaction()` commits or rolls back."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self._migrate()

    def _migrate(self) -> None:
        """Brings an older database file up to the current schema, one version at a time."""
        conn = self._connection()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.executescript(f"BEGIN; {script} PRAGMA user_version = {number}; COMMIT;")

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Runs the block in one immediate transaction, so concurrent writers queue instead of failing."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        """Reads rows outside any write transaction."""
        return self._connection().execute(sql, args).fetchall()
