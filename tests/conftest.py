"""Shared fixtures: tiny structured data sets, a tiny trained bundle (built once), databases.

Databases: ``db`` is a migrated database, once on SQLite (a file under ``tmp_path``) and
once on PostgreSQL (a database of its own, created for the test and dropped after it);
``blank_db`` is the same without the migrations; ``sqlite_db`` is SQLite only.
PostgreSQL is ``postgresql://postgres@127.0.0.1:5432/test`` (or ``$TRIAGE_TEST_POSTGRES_URL``),
used only to create and drop the per-test databases; where it does not answer, the
PostgreSQL tests fail (scripts/test installs and starts it). Those tests carry the marker
``postgres``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from flows.build import BuildOptions, build_bundle
from flows.bundle import Bundle
from flows.presets import get_preset
from storage.db import Database
from storage.migrate import upgrade

# Nodes started by the tests serve their web page on a free port, never a fixed one.
os.environ.setdefault("TRIAGE_WEB__PORT", "0")

POSTGRES_URL_ENV = "TRIAGE_TEST_POSTGRES_URL"
POSTGRES_DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def blobs(n: int, shape: tuple[int, ...], *, abnormal: float = 0.0, seed: int = 0
          ) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random images in [0, 1]; 'abnormal' ones carry a bright square."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random((n, *shape)), sigma=[0] + [1.5] * len(shape))
    x = (x - x.min()) / (x.max() - x.min()) * 0.6 + 0.2
    labels = (rng.random(n) < abnormal).astype(np.int64)
    for i in np.flatnonzero(labels):
        sl = tuple(slice(s // 4, s // 4 + max(2, s // 3)) for s in shape)
        x[(i, *sl)] = 0.95
    return x[:, None].astype(np.float32), labels


@pytest.fixture(scope="session")
def ct_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A tiny chest-CT patch bundle (read-only: shared by every module)."""
    from nodekit import chest_ct_patch_bundle

    return chest_ct_patch_bundle(tmp_path_factory.mktemp("ctb") / "tiny-chestct")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    preset = get_preset("tiny-cxr")
    normal, _ = blobs(64, (16, 16), seed=1)
    mixture, _ = blobs(64, (16, 16), abnormal=0.5, seed=2)
    val = blobs(40, (16, 16), abnormal=0.5, seed=3)
    out: Path = tmp_path_factory.mktemp("bundle") / "tiny"
    return build_bundle(out, preset=preset, normal=normal, mixture=mixture, name="tiny",
                        options=BuildOptions(progress=False), validation=val, log=lambda s: None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: runs against PostgreSQL (the PostgreSQL half of `db`)")
    config.addinivalue_line("markers", "faults: fault injection (a process killed, a peer down, a full "
                            "disk): part of the test command; `-m faults` runs only them")


def _libpq(url: URL) -> str:
    """The URL as libpq takes it (no SQLAlchemy driver suffix)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_admin_url() -> URL:
    """The server's maintenance database (checked once; a failure fails every PostgreSQL test)."""
    url = make_url(os.environ.get(POSTGRES_URL_ENV) or POSTGRES_DEFAULT_URL)
    error = None
    try:
        with psycopg.connect(_libpq(url), connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        error = " ".join(str(exc).split())
    if error is not None:  # (outside the except: no "during handling" chain in the report)
        pytest.fail(
            f"PostgreSQL is not reachable at {url.render_as_string(hide_password=True)}: {error}\n"
            "The storage tests run on PostgreSQL as well as SQLite. scripts/test installs and starts "
            "it (as root on Debian: apt-get install postgresql, trust auth for 127.0.0.1, database "
            f"'test'); or point ${POSTGRES_URL_ENV} at a server where this user may CREATE DATABASE.",
            pytrace=False)
    return url


@contextmanager
def postgres_database(admin: URL) -> Iterator[str]:
    """A new, empty, uniquely named database on the server of ``admin``; dropped afterwards."""
    name = f"triage_test_{secrets.token_hex(6)}"
    with psycopg.connect(_libpq(admin), autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' "
                             "TEMPLATE template0").format(sql.Identifier(name)))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_libpq(admin), autocommit=True, connect_timeout=5) as conn:
            # FORCE: connections a test left open (a pool, a child process) must not keep it.
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def blank_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """An empty database (no tables), on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'triage.db'}")
        try:
            yield database
        finally:
            database.dispose()
        return
    with postgres_database(request.getfixturevalue("postgres_admin_url")) as url:
        database = Database(url)
        try:
            yield database
        finally:
            database.dispose()


@pytest.fixture
def db(blank_db: Database) -> Database:
    """A database migrated to head, on SQLite and on PostgreSQL."""
    upgrade(blank_db)
    return blank_db


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    """A SQLite database migrated to head, for tests that need no PostgreSQL run."""
    database = Database(f"sqlite:///{tmp_path / 'triage.db'}")
    upgrade(database)
    try:
        yield database
    finally:
        database.dispose()
