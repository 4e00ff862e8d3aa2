"""The settings in effect: the environment's, with what an admin changed at run time on top.

Why in the database: an admin's change (PATCH /admin/settings, A1111's `sd_model_checkpoint`)
must reach every API replica and every cluster worker, not only the process that answered. Each
process reads the table every POLL_SECONDS and applies a change it finds (a worker between
batches: its engine reads the settings once per batch); the process that made the change applies
it at once. A change stays until it is changed again or reset (`null`), restarts included.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, insert, select

from config import Settings, problems
from imagegen.catalogue import ModelSpec, build_catalogue
from imagegen.db import Database, db_now, runtime_settings
from imagegen.protocol import TUNABLES, SettingsPatch

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0  # how soon another process sees a change
OPTION = "option."  # the prefix of a stored option that is not a setting (A1111's checkpoint)
LEGACY_FILE = "runtime-settings.json"  # where 0.2 kept persisted adjustments, imported once


class LiveSettings:
    """The settings in effect (`current`) and the catalogue they make, refreshed from the database;
    `listeners` are called with the new settings whenever they change."""

    def __init__(self, base: Settings, db: Database) -> None:
        self.base, self.db = base, db
        self.listeners: list[Callable[[Settings], None]] = []
        self._lock = threading.Lock()
        self._stored: dict[str, Any] = {}
        self._current = base
        self.catalogue: dict[str, ModelSpec] = {}  # built once below, or by the first refresh that finds changes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._import_legacy_file()
        self.refresh()
        if not self.catalogue:  # nothing stored: the environment's own
            self.catalogue = build_catalogue(base)

    @property
    def current(self) -> Settings:
        return self._current

    def overrides(self) -> dict[str, Any]:
        """The settings an admin changed, by field name."""
        return {name: value for name, value in self._stored.items() if not name.startswith(OPTION)}

    def described(self) -> dict[str, dict[str, Any]]:
        """Each setting an admin may change: the value in effect, where it came from (`admin`, else
        the start's origin: `environment`, `preset` or `default`) and the start's value."""
        changed = self.overrides()
        return {
            name: {
                "value": getattr(self._current, name),
                "source": "admin" if name in changed else self.base.origin(name),
                "start_value": getattr(self.base, name),
            }
            for name in TUNABLES
        }

    def option(self, name: str) -> Any:
        """A stored option that is not a setting (None when never set)."""
        return self._stored.get(OPTION + name)

    def refresh(self) -> bool:
        """Reads the stored changes; applies and announces them when they differ. True on a change."""
        rows = self.db.query(select(runtime_settings.c.name, runtime_settings.c.value))
        stored = {row["name"]: json.loads(row["value"]) for row in rows}
        with self._lock:
            if stored == self._stored:
                return False
            self._stored = stored
            current = self._settle(self.overrides())
            if current != self._current or not self.catalogue:  # the globals fill what no entry or family sets
                self.catalogue = build_catalogue(current)
            self._current = current
        for listener in self.listeners:
            listener(current)
        return True

    def _settle(self, overrides: dict[str, Any]) -> Settings:
        """The base with the overrides that still make valid settings (a stored value the
        environment no longer allows, e.g. over a lowered MAX_STEPS, is left out with an error)."""
        try:
            checked = SettingsPatch.model_validate(overrides).model_dump(exclude_unset=True, exclude={"persist"})
            return with_changes(self.base, checked)
        except (ValidationError, ValueError) as exc:
            log.error("runtime settings %s do not apply over the environment's (%s); ignored", overrides, exc)
            return self.base

    def change(self, changes: dict[str, Any], options: dict[str, Any] | None = None) -> Settings:
        """Stores settings (`None` resets one to the environment's) and options, and applies them
        here at once; a value that makes invalid settings is a ValueError naming it, and nothing is
        stored then."""
        overrides = {**self.overrides(), **changes}
        overrides = {name: value for name, value in overrides.items() if value is not None}
        with_changes(self.base, overrides)  # raises before anything is written
        named = {**changes, **{OPTION + name: value for name, value in (options or {}).items()}}
        with self.db.transaction() as conn:
            for name, value in named.items():
                row = runtime_settings.c.name == name
                conn.execute(delete(runtime_settings).where(row))
                if value is not None:
                    stored = {"name": name, "value": json.dumps(value), "updated_at": db_now()}
                    conn.execute(insert(runtime_settings).values(**stored))
        self.refresh()
        return self._current

    def _import_legacy_file(self) -> None:
        """Moves adjustments persisted by an earlier version (DATA_DIR/runtime-settings.json) into the
        database, once, where no change of the same setting was stored since."""
        path = Path(self.base.data_dir) / LEGACY_FILE
        if not path.is_file():
            return
        try:
            saved = SettingsPatch.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise SystemExit(f"invalid {path}: {str(exc).splitlines()[0]}; fix or delete it") from None
        known = {row["name"] for row in self.db.query(select(runtime_settings.c.name))}
        changes = {k: v for k, v in saved.model_dump(exclude_unset=True, exclude={"persist"}).items() if k not in known}
        if changes:
            self.change(changes)
        os.replace(path, path.with_suffix(".imported"))
        log.warning("imported the runtime settings of %s into the database: %s", path, changes)

    def start(self) -> None:
        """Polls the database every POLL_SECONDS from a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="runtime-settings", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.refresh()
            except Exception as exc:  # the database away for a moment: the settings in effect stay
                log.warning("runtime settings unreadable (%s); keeping those in effect", exc)


def with_changes(settings: Settings, changes: dict[str, Any]) -> Settings:
    """The settings with these fields changed, checked as at start-up (ValueError naming the field
    and its limit)."""
    if not changes:
        return settings
    try:
        return Settings(**{**settings.model_dump(), **changes, "_env_file": None})
    except ValidationError as exc:
        raise ValueError(problems(exc)) from None
