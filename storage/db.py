"""Engines and sessions for SQLite (embedded default) and PostgreSQL (scale-out).

SQLite runs in WAL mode with ``synchronous=FULL``: a commit is on disk when it returns,
which the receive stage needs before it acknowledges an instance. Several processes
(the SCP, the executor, the web page) share the file; ``busy_timeout`` makes a writer
wait for another instead of failing at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["Database", "normalise_url"]

SQLITE_BUSY_MS = 30_000


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` (psycopg 3 is the installed driver) and ``sqlite:///path``."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's implicit transactions break SAVEPOINT and "BEGIN IMMEDIATE"; SQLAlchemy
    # issues BEGIN itself (see the "begin" listener).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    cur.close()


class Database:
    """One engine and its session factory."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = normalise_url(url)
        u = make_url(self.url)
        self.dialect = u.get_backend_name()
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True}
        if self.dialect == "sqlite":
            if u.database and u.database != ":memory:":
                Path(u.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_MS / 1000}
        self.engine: Engine = create_engine(self.url, **kwargs)
        self.read_engine = self.engine
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            # BEGIN IMMEDIATE: take the write lock at the start, so two writers never
            # deadlock upgrading read locks (SQLite would fail one with SQLITE_BUSY at once).
            event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
            # Readers take no write lock: WAL lets them run beside the one writer.
            self.read_engine = create_engine(self.url, **kwargs)
            event.listen(self.read_engine, "connect", _sqlite_pragmas)
            event.listen(self.read_engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        self._writers = sessionmaker(self.engine, expire_on_commit=False)
        self.sessions = sessionmaker(self.read_engine, expire_on_commit=False)
        """Sessions for reading (on SQLite they never block the writer)."""

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write transaction: committed on success, rolled back on error.

        On PostgreSQL (READ COMMITTED) a read-then-write must lock what it read
        (``with_for_update``) or be a single compare-and-set statement.
        """
        with self._writers() as s, s.begin():
            yield s

    def dispose(self) -> None:
        self.engine.dispose()
        self.read_engine.dispose()
