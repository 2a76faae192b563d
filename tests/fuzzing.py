"""Fuzz target and mutators for the path from received bytes to the arrays the models see (issue 8C).

:class:`Target` runs one input through the node's own functions, in-process and without a
network, exactly in the order the node runs them:

1. **negotiation**: each file's (SOP class, transfer syntax) must be one the storage SCP
   accepts (``StorageSCP.ae.supported_contexts``); else the file is ``context-rejected``;
2. **C-STORE**: ``StorageSCP._on_store`` with the data set bytes as sent (the part of the
   file after its meta information, as pynetdicom's chunked mode sends a file), which calls
   ``Ingest.store_dataset``: header checks, the blob, the index rows; the status it answers;
3. **release**: ``StorageSCP._on_released`` (the early finish of ``triage.assemble``), then
   ``finish_quiet`` as the quiet period would run it: routing (``triage.route``) and a Job
   for every routed series;
4. **the job**: ``worker.tasks.run_job`` — the files of the series, ``analyse_series``,
   ``read_series`` (``triage.imaging``), the kind checks, the bundle (the demo bundles in
   ``models/``) and its preprocessing (``Preprocessing.apply`` for a posterior bundle, the
   resampling, windowing and mask of ``flows.patchbundle._prepared`` for a patch bundle) —
   up to the model: the scorer (``PosteriorScorer.score_maps``, ``flows.patchbundle._maps``)
   is replaced by a catcher that takes the arrays it would be given and stops there.

Every input gets a fresh node state (a copy of a migrated SQLite database, an empty blob
store), so an outcome depends on the input only.

An input is a Part 10 file, or several (one association's worth) packed by :func:`pack`.

**Clean outcomes** (not findings): a file the sender cannot send (no readable file meta) or
one whose context the SCP rejects; a C-STORE status ``0x0000``, ``0xA900``, ``0xC001``,
``0xC002`` or ``0xC003`` (``triage/ingest.py``, docs/bad-input.md); a series routed to
``ignore``; a job that fails with an ``AnalysisError`` (an ``ImagingError`` or a
preprocessing ``ValueError`` wrapped with its reason); arrays handed to the model.

**Findings** (:class:`Finding`): any other exception out of these functions; an exception
the node catches and logs at ERROR level (``run_job`` re-queues a job after an unexpected
exception, the SCP's release handler logs one: both mean a bug the fuzzer must report);
``0xA700`` (out of resources) for an input on an empty node; a model input that is not
finite, not float32, outside [0, 1] or not of the bundle's shape; an input that takes more
than ``slow_seconds``.

The mutators (:class:`Mutator`) work on three levels: bytes (flips, interesting values,
truncation, inserted/deleted runs), elements (the top-level elements of the data set as
pydicom's reader finds them, re-encoded with another value or VR, deleted, duplicated;
optionally on every file of a series at once) and files (the transfer syntax or SOP class
in the file meta, dropped, duplicated or reordered files).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import logging
import math
import random
import re
import shutil
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator, read_dataset, read_preamble
from pydicom.uid import UID
from sqlalchemy import select

import flows.patchbundle
import triage.analyze
from storage.blobs import BlobStore
from storage.db import Database
from storage.migrate import upgrade
from storage.models import Job, Series, utcnow
from triage.assemble import finish_quiet
from triage.config import Settings, load_settings
from triage.ingest import Ingest, part10_prefix
from triage.receive import StorageSCP
from worker.tasks import NodeContext, run_job

__all__ = ["CLEAN_STATUSES", "MAGIC", "Finding", "Mutator", "Outcome", "Target", "pack", "seed_corpus",
           "unpack"]

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MAGIC = b"TRIAGE-FUZZ-1\n"
CLEAN_STATUSES = (0x0000, 0xA900, 0xC001, 0xC002, 0xC003)
_LOGGERS = ("triage", "worker", "storage", "flows")


# --------------------------------------------------------------------------- inputs


def pack(files: Sequence[bytes]) -> bytes:
    """Several Part 10 files (sent on one association, in order) as one fuzz input."""
    return MAGIC + b"".join(struct.pack("<I", len(f)) + f for f in files)


def unpack(data: bytes) -> list[bytes]:
    """The files of an input; an input without :data:`MAGIC` is one file (never raises)."""
    if not data.startswith(MAGIC):
        return [data]
    out: list[bytes] = []
    pos = len(MAGIC)
    while pos + 4 <= len(data) and len(out) < 64:
        n = int.from_bytes(data[pos:pos + 4], "little")
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


@dataclass(frozen=True)
class _File:
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    start: int  # offset of the data set


def _not_meta(tag: Any, vr: str | None, length: int) -> bool:
    return int(tag) >> 16 != 0x0002


def split(data: bytes) -> _File | None:
    """The file meta as the sender reads it (pynetdicom's ``split_dataset``), None when the
    file cannot be sent (no preamble, unreadable meta, no SOP class/instance/transfer syntax)."""
    fp = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read_preamble(fp, False)
            meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_not_meta)
            values = [str(meta.get(k, "") or "").strip("\x00 ") for k in
                      ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")]
    except Exception:
        return None
    if not all(values) or not all(v.isascii() and v.isprintable() for v in values):
        return None
    return _File(values[0], values[1], values[2], start=fp.tell())


# --------------------------------------------------------------------------- outcomes


class Finding(Exception):  # noqa: N818 (what a fuzzer reports: a finding)
    """What the fuzzer reports: ``kind`` is ``exception``, ``logged-exception``, ``job`` (a job
    re-queued), ``out-of-resources``, ``status``, ``model-input`` or ``slow``."""

    def __init__(self, kind: str, message: str, *, where: str = "",
                 cause: BaseException | None = None) -> None:
        super().__init__(f"{kind}: {message}" + (f" (at {where})" if where else ""))
        self.kind = kind
        self.message = message
        self.where = where
        self.cause = cause

    @property
    def signature(self) -> str:
        """What makes two findings the same bug: the kind, the exception type and the place."""
        head = self.message.split(":", 1)[0] if self.kind != "slow" else ""
        return f"{self.kind}|{head}|{self.where}"


_NUM = re.compile(r"[0-9][0-9.eE+-]*")


def _norm(text: str, limit: int = 72) -> str:
    return _NUM.sub("#", text)[:limit]


@dataclass
class Outcome:
    """What the node did with one input."""

    statuses: list[str] = field(default_factory=list)  # per file: unsendable | context-rejected | 0xNNNN
    comments: list[str] = field(default_factory=list)  # the Error Comments of refused files
    routes: list[str] = field(default_factory=list)  # per stored series: kind (reason)
    jobs: list[str] = field(default_factory=list)  # per job: failed: reason | model: shapes
    model_inputs: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def reached_model(self) -> bool:
        return bool(self.model_inputs)

    def signature(self) -> str:
        """The outcome with numbers blanked, for counting distinct outcomes."""
        parts = [",".join(sorted(set(self.statuses)))]
        parts += sorted({_norm(c, 48) for c in self.comments})
        parts += sorted({_norm(r, 60) for r in self.routes})
        parts += sorted({_norm(j, 72) for j in self.jobs})
        return " | ".join(parts)


class _ModelInput(BaseException):  # (run_job's "except Exception" lets it by)
    """Raised by the catcher that stands in for the scorer: the arrays the model would see."""

    def __init__(self, kind: str, method: str, arrays: list[np.ndarray], masks: list[Any],
                 shape: tuple[int, ...]) -> None:
        super().__init__(kind)
        self.kind, self.method, self.arrays, self.masks, self.shape = kind, method, arrays, masks, shape


class _PosteriorCatcher:
    """Stands in for ``triage.analyze.PosteriorScorer``."""

    def __init__(self, bundle: Any, batch_size: int = 1) -> None:
        self.bundle = bundle

    def score_maps(self, images: np.ndarray) -> Any:
        prep = self.bundle.preprocessing
        raise _ModelInput(prep.kind, "posterior", [images], [], (1, 1, *prep.shape))


def _patch_catcher(bundle: Any, prepared: Sequence[tuple[np.ndarray, Any]], *args: Any, **kwargs: Any) -> Any:
    """Stands in for ``flows.patchbundle._maps``: the resampled, windowed volume and its mask."""
    raise _ModelInput(bundle.preprocessing.kind, "patch map", [g for g, _ in prepared],
                      [m for _, m in prepared], ())


def check_model_input(mi: _ModelInput) -> list[tuple[str, tuple[int, ...]]]:
    """Raises :class:`Finding` unless every array is finite float32 in [0, 1] of the right shape."""
    out = []
    for k, a in enumerate(mi.arrays):
        arr = np.asarray(a)
        what = f"{mi.kind} {mi.method} input {k} {arr.dtype} {arr.shape}"
        if arr.dtype != np.float32:
            raise Finding("model-input", f"{what}: not float32")
        if mi.shape and arr.shape != mi.shape:
            raise Finding("model-input", f"{what}: the bundle expects {mi.shape}")
        if not mi.shape and (arr.ndim != 3 or min(arr.shape) < 1):
            raise Finding("model-input", f"{what}: not a 3D volume")
        bad = int((~np.isfinite(arr)).sum())
        if bad:
            raise Finding("model-input", f"{what}: {bad} non-finite value(s)")
        if arr.size and (float(arr.min()) < 0.0 or float(arr.max()) > 1.0):
            raise Finding("model-input", f"{what}: values outside [0, 1]")
        if k < len(mi.masks) and mi.masks[k] is not None:
            m = np.asarray(mi.masks[k])
            if m.shape != arr.shape or m.dtype != bool:
                raise Finding("model-input", f"{what}: mask {m.dtype} {m.shape}")
        out.append((f"{mi.kind}/{mi.method}", tuple(int(s) for s in arr.shape)))
    return out


def _where(exc: BaseException) -> str:
    """The innermost frame of the project's own code in the traceback (else the innermost)."""
    tb, last, ours = exc.__traceback__, "", ""
    while tb is not None:
        f = tb.tb_frame.f_code.co_filename
        loc = f"{Path(f).name}:{tb.tb_frame.f_code.co_name}"
        last = loc
        if f.startswith(str(ROOT)) and "/tests/" not in f and "/.venv/" not in f:
            ours = f"{Path(f).relative_to(ROOT)}:{tb.tb_lineno}:{tb.tb_frame.f_code.co_name}"
        tb = tb.tb_next
    return ours or last


class _Catch(logging.Handler):
    """Records the node logs at ERROR and above (its catch-alls log unexpected exceptions)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _Assoc:
    """What the SCP's handlers read of an association (weak-referenceable, like pynetdicom's)."""

    requestor = SimpleNamespace(ae_title="FUZZ", address="127.0.0.1", port=104)


def _event(assoc: _Assoc, f: _File | None = None, body: bytes = b"") -> Any:
    if f is None:
        return SimpleNamespace(assoc=assoc)
    return SimpleNamespace(
        assoc=assoc, request=SimpleNamespace(AffectedSOPInstanceUID=f.sop_instance),
        context=SimpleNamespace(abstract_syntax=f.sop_class, transfer_syntax=f.transfer_syntax),
        encoded_dataset=lambda include_meta=False: body)


# --------------------------------------------------------------------------- the target


class Target:
    """One fresh node state per input; call it with the input's bytes (see the module doc)."""

    def __init__(self, workdir: Path | None = None, *, slow_seconds: float = 5.0,
                 models: Path = MODELS) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:  # in memory where there is a tmpfs: nothing here needs to be durable
            shm = Path("/dev/shm")
            self._tmp = tempfile.TemporaryDirectory(prefix="triage-fuzz-", dir=shm if shm.is_dir() else None)
            workdir = Path(self._tmp.name)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.slow_seconds = slow_seconds
        self.settings: Settings = load_settings(
            node={"data_dir": str(self.workdir / "node")}, storage={"fsync": False},
            models={"cxr": str(models / "cxr"), "bct": str(models / "bct"),
                    "chestct": str(models / "chestct"), "device": "cpu"},
            web={"enabled": False})
        self._template = self.workdir / "template.db"
        db = Database(f"sqlite:///{self._template}")
        upgrade(db)
        db.dispose()
        self._run = self.workdir / "run"
        self._run.mkdir(exist_ok=True)
        self._db = Database(f"sqlite:///{self._run / 'triage.db'}")
        self.scp = StorageSCP(self.settings, db=Database(f"sqlite:///{self._template}"),
                              blobs=BlobStore(self.workdir / "blobs0", fsync=False))
        self.scp.db.dispose()
        self.accepted = {(str(cx.abstract_syntax), str(ts)) for cx in self.scp.ae.supported_contexts
                         for ts in cx.transfer_syntax}
        self.ctx = NodeContext(self.settings, report=lambda ctx, rid: None)
        self.models = self.ctx.models  # the bundles, loaded once on first use and kept
        self._catch = _Catch()
        for name in _LOGGERS:
            logging.getLogger(name).addHandler(self._catch)

    def close(self) -> None:
        self._db.dispose()
        for name in _LOGGERS:
            logging.getLogger(name).removeHandler(self._catch)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _fresh_node(self) -> Iterator[tuple[Database, BlobStore]]:
        """The migrated template database copied over the run's database file. One engine for
        all inputs (its pool disposed in between): it keeps SQLAlchemy's compiled statements."""
        db = self._db
        db.dispose()
        for suffix in ("", "-wal", "-shm", "-journal"):
            (self._run / f"triage.db{suffix}").unlink(missing_ok=True)
        shutil.copyfile(self._template, self._run / "triage.db")
        shutil.rmtree(self._run / "blobs", ignore_errors=True)
        try:
            yield db, BlobStore(self._run / "blobs", fsync=False)
        finally:
            db.dispose()

    def __call__(self, data: bytes) -> Outcome:
        """Run one input; returns its :class:`Outcome` or raises :class:`Finding`."""
        t0 = time.perf_counter()
        self._catch.records.clear()
        for name in _LOGGERS:  # a quiet root logger (level CRITICAL) must not hide the node's errors
            logger = logging.getLogger(name)
            if logger.getEffectiveLevel() > logging.ERROR:
                logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = self._run_one(data)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Finding:
            self._raise_logged()  # what the node logged says more (where it was raised)
            raise
        except BaseException as exc:  # (a Rust decoder's panic is a BaseException: pyo3's PanicException)
            raise Finding("exception", f"{type(exc).__name__}: {exc}"[:500], where=_where(exc),
                          cause=exc) from exc
        out.seconds = time.perf_counter() - t0
        self._raise_logged()
        if out.seconds > self.slow_seconds:
            raise Finding("slow", f"{out.seconds:.1f} s for one input ({out.signature()[:200]})")
        return out

    def _raise_logged(self) -> None:
        for rec in self._catch.records:
            logged = rec.exc_info[1] if rec.exc_info else None
            msg = f"{type(logged).__name__}: {logged}" if logged is not None else rec.getMessage()
            raise Finding("logged-exception", f"{msg} (logged by {rec.name}: {rec.getMessage()})"[:500],
                          where=_where(logged) if logged is not None else f"{rec.name}:{rec.lineno}",
                          cause=logged)

    def _run_one(self, data: bytes) -> Outcome:
        out = Outcome()
        with self._fresh_node() as (db, blobs):
            scp = self.scp
            scp.db, scp.blobs = db, blobs
            scp.ingest = Ingest(db, blobs, high_water=self.settings.storage.high_water,
                                max_side=self.settings.receive.max_side,
                                max_frames=self.settings.receive.max_frames)
            assoc = _Assoc()
            for member in unpack(data):
                f = split(member)
                if f is None:
                    out.statuses.append("unsendable")
                    continue
                if (f.sop_class, f.transfer_syntax) not in self.accepted:
                    out.statuses.append("context-rejected")
                    continue
                status = scp._on_store(_event(assoc, f, member[f.start:]))
                code = int(status if isinstance(status, int) else status.Status)
                out.statuses.append(f"0x{code:04X}")
                if isinstance(status, Dataset):
                    out.comments.append(str(status.get("ErrorComment", "")))
                if code not in CLEAN_STATUSES:
                    comment = out.comments[-1] if out.comments else ""
                    raise Finding("out-of-resources" if code == 0xA700 else "status",
                                  f"0x{code:04X} {comment}")
            scp._on_released(_event(assoc))  # the early finish
            finish_quiet(db, self.settings, now=utcnow() + dt.timedelta(days=1))  # the quiet period
            with db.sessions() as s:
                for se in s.scalars(select(Series).order_by(Series.id)):
                    out.routes.append(f"{se.kind} ({se.route_reason})")
                jobs = list(s.scalars(select(Job.id).where(Job.state == "queued").order_by(Job.id)))
            ctx = self.ctx
            ctx.db, ctx.blobs = db, blobs
            for job_id in jobs:
                with mock.patch.object(triage.analyze, "PosteriorScorer", _PosteriorCatcher), \
                        mock.patch.object(flows.patchbundle, "_maps", _patch_catcher):
                    try:
                        state = run_job(ctx, job_id, "fuzz")
                    except _ModelInput as mi:
                        got = check_model_input(mi)
                        out.model_inputs += got
                        out.jobs.append("model " + " ".join(f"{k}{list(s)}" for k, s in got))
                        continue
                with db.sessions() as s:
                    job = s.get(Job, job_id)
                    assert job is not None
                    out.jobs.append(f"{state}: {job.reason}")
                if state != "failed":  # re-queued: an unexpected exception (also logged)
                    raise Finding("job", f"run_job returned {state!r}: {job.reason}"[:500])
        return out


# --------------------------------------------------------------------------- mutators

INTS = [0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 24, 31, 32, 33, 63, 64, 255, 256, 4095, 4096, 16383, 16384,
        16385, 32767, 32768, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, -1, -2, -32768, -(2**31)]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 1e-45, 1e300, 3.4e38, -3.4e38, math.nan, math.inf, -math.inf,
          2.0**31, 1e6, 1e-6]
TEXTS = ["", " ", "0", "-0", "1", "-1", "2", "3", "16", "0.001", "1e-6", "1e6", "1e38", "1e308", "-1e308",
         "1e-320", "NaN", "nan", "inf", "-inf", "Infinity", "2147483648", "-2147483649", "4294967296",
         "99999999999999999999999", "0x10", "abc", "1,5", "1\\1", "0\\0", "1\\0", "-1\\1", "nan\\1",
         "inf\\inf", "1e-300\\1e-300", "1e300\\1e300", "1\\2\\3", "0\\0\\0", "1e308\\1e308\\1e308",
         "nan\\0\\0", "1\\0\\0\\0\\1\\0", "0\\0\\0\\0\\0\\0", "1\\0\\0\\0\\0\\1", "0\\1\\0\\0\\0\\-1",
         "1\\0\\0\\0\\1\\0\\0", "nan\\0\\0\\0\\1\\0", "1e-9\\0\\0\\0\\1e-9\\0",
         "L\\F", "R\\H", "F\\L", "A\\P",
         "MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL_422", "YBR_FULL", "YBR_RCT",
         "CT", "DX", "CR", "MR", "SC", "PA", "AP", "LL", "CHEST", "HEAD", "BRAIN", "LOCALIZER",
         "ORIGINAL\\PRIMARY\\AXIAL", "triage-node", "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 87",
         "\\ISO 2022 IR 87", "ISO_IR 999", "\x1b$B", "A" * 300, "\x00" * 8, "\xff\xfe"]
UIDS = ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.4",
        "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.128", "1.2.3", "1.2.3.4.5.6", "", "1..2",
        "1.2.3/../x", "1." * 40 + "1", "2.25.1"]
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                     "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50",
                     "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
                     "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
                     "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95",
                     "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.112", "1.2.840.10008.1.2.4.201",
                     "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.1.98",
                     "1.2.840.10008.1.2.8.1", "1.2.3.4"]
SOP_CLASSES = UIDS[:8]

# the attributes the header checks, imaging and routing read, with their standard VR
TAGS: dict[int, str] = {
    0x00080005: "CS", 0x00080008: "CS", 0x00080016: "UI", 0x00080018: "UI", 0x00080060: "CS",
    0x00080070: "LO", 0x00081030: "LO", 0x0008103E: "LO", 0x00100010: "PN", 0x00180015: "CS",
    0x00180050: "DS", 0x00180088: "DS", 0x00181114: "DS", 0x00181164: "DS", 0x00185101: "CS",
    0x0020000D: "UI", 0x0020000E: "UI", 0x00200013: "IS", 0x00200020: "CS", 0x00200032: "DS",
    0x00200037: "DS", 0x00200052: "UI", 0x00201002: "IS", 0x00280002: "US", 0x00280004: "CS",
    0x00280006: "US", 0x00280008: "IS", 0x00280010: "US", 0x00280011: "US", 0x00280030: "DS",
    0x00280100: "US", 0x00280101: "US", 0x00280102: "US", 0x00280103: "US", 0x00280120: "US",
    0x00281050: "DS", 0x00281051: "DS", 0x00281052: "DS", 0x00281053: "DS", 0x00281054: "LO",
    0x00283000: "SQ", 0x00282110: "CS", 0x7FE00008: "OF", 0x7FE00009: "OD", 0x7FE00010: "OW",
}
VRS = ["AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OW",
       "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"]
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


@dataclass(frozen=True)
class _Element:
    tag: int
    vr: str | None
    start: int  # offset of the element header in the file
    value: int  # offset of the value
    end: int  # offset after the element (the value of an undefined length included)


def _encoding(ts: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of a transfer syntax; unknown ones as explicit little."""
    t = UID(ts)
    if not t.is_transfer_syntax:
        return False, True
    return t.is_implicit_VR, t.is_little_endian


def elements(data: bytes, f: _File) -> list[_Element]:
    """The top-level elements of the data set, as pydicom's reader walks them (may be partial)."""
    implicit, little = _encoding(f.transfer_syntax)
    t = UID(f.transfer_syntax)
    if t.is_transfer_syntax and t.is_deflated:
        return []
    fp = io.BytesIO(data)
    fp.seek(f.start)
    out: list[_Element] = []
    start = f.start
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for raw in data_element_generator(fp, implicit, little, defer_size=256):
                end = fp.tell()
                vt = int(getattr(raw, "value_tell", start + 8) or start + 8)
                out.append(_Element(int(raw.tag), raw.VR, start, vt, end))
                start = end
    except Exception:
        pass
    return out


def encode_element(tag: int, vr: str | None, value: bytes, *, implicit: bool, little: bool,
                   length: int | None = None) -> bytes:
    """One element header and value in the given encoding; ``length`` may lie."""
    if len(value) % 2 and length is None:
        value += b"\x00" if vr in ("UI", "OB", "UN") else b" "
    n = len(value) if length is None else length
    e = "<" if little else ">"
    head = struct.pack(e + "HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack(e + "I", n & 0xFFFFFFFF) + value
    vrb = (vr or "UN").encode("latin-1")[:2].ljust(2, b" ")
    if (vr or "UN") in _LONG_VRS or n > 0xFFFF:
        return head + vrb + b"\x00\x00" + struct.pack(e + "I", n & 0xFFFFFFFF) + value
    return head + vrb + struct.pack(e + "H", n) + value


def _value_for(vr: str, rng: random.Random, little: bool) -> bytes:
    e = "<" if little else ">"
    vm = rng.choice([1, 1, 1, 2, 3])
    if vr in ("US", "SS", "UL", "SL", "AT", "SV", "UV", "OL"):
        fmt = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "AT": "I", "OL": "I", "SV": "q", "UV": "Q"}[vr]
        bits = struct.calcsize(fmt) * 8
        vals = [rng.choice(INTS) % (1 << bits) for _ in range(vm)]
        if fmt.islower():
            vals = [v - (1 << bits) if v >= 1 << (bits - 1) else v for v in vals]
        return struct.pack(e + fmt * vm, *vals)
    if vr in ("FL", "FD", "OF", "OD"):
        return _floats_bytes([rng.choice(FLOATS) for _ in range(vm)], 4 if vr in ("FL", "OF") else 8, little)
    if vr in ("OB", "OW", "UN"):
        n = rng.choice([0, 1, 2, 4, 8, 64, 512, 4096])
        return bytes(rng.getrandbits(8) for _ in range(n)) if n <= 64 else rng.randbytes(n)
    if vr == "UI":
        return rng.choice(UIDS).encode()
    if vr == "SQ":
        return _sequence(rng, little)
    text = "\\".join(rng.choice(TEXTS) for _ in range(vm)) if rng.random() < 0.3 else rng.choice(TEXTS)
    return text.encode("latin-1", "replace")


def _floats_bytes(values: list[float], width: int, little: bool) -> bytes:
    """IEEE floats of ``width`` bytes (too large for float32: inf)."""
    dt = np.dtype(("<" if little else ">") + ("f4" if width == 4 else "f8"))
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float64).astype(dt).tobytes()


def _sequence(rng: random.Random, little: bool) -> bytes:
    """A Modality LUT Sequence item (explicit VR): LUT Descriptor, LUT Data, or nothing."""
    e = "<" if little else ">"
    n = rng.choice([0, 1, 2, 16, 256, 4096, 65535])
    bits = rng.choice([0, 1, 8, 16, 17, 32])
    first = rng.choice([0, -1, 1, 32768, 65535])
    desc = encode_element(0x00283002, "US", struct.pack(e + "HHH", n & 0xFFFF, first & 0xFFFF, bits),
                          implicit=False, little=little)
    lut = encode_element(0x00283006, "OW", rng.randbytes(2 * min(n, rng.choice([0, 1, n]))),
                         implicit=False, little=little)
    typ = encode_element(0x00283004, "LO", b"HU", implicit=False, little=little)
    body = b"".join(x for x in (desc, typ, lut) if rng.random() < 0.85)
    item_head = struct.pack(e + "HHI", 0xFFFE, 0xE000, len(body))
    return item_head + body if rng.random() < 0.9 else b""


_BYTE_VALUES = [0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF, 0x20, 0x5C, 0x2E]


def mutate_bytes(data: bytes, rng: random.Random, lo: int = 0) -> bytes:
    """One byte-level change at or after ``lo`` (the data set, not the meta, by default)."""
    b = bytearray(data)
    n = len(b)
    if n <= lo:
        return bytes(b) + bytes([rng.getrandbits(8)])
    pos = rng.randrange(lo, n)
    op = rng.randrange(9)
    if op == 0:  # flip a bit
        b[pos] ^= 1 << rng.randrange(8)
    elif op == 1:  # an interesting byte
        b[pos] = rng.choice(_BYTE_VALUES)
    elif op == 2:  # an interesting 16- or 32-bit integer (lengths, sizes)
        width, fmt = rng.choice([(2, "<H"), (4, "<I"), (2, ">H"), (4, ">I")])
        v = rng.choice(INTS) % (1 << (8 * width))
        b[pos:pos + width] = struct.pack(fmt, v)
    elif op == 3:  # truncate
        del b[pos:]
    elif op == 4:  # delete a run
        del b[pos:pos + rng.choice([1, 2, 4, 8, 64, 512])]
    elif op == 5:  # insert a run
        b[pos:pos] = rng.randbytes(rng.choice([1, 2, 4, 8, 64]))
    elif op == 6:  # copy a chunk over another place
        src = rng.randrange(lo, n)
        k = rng.choice([2, 4, 8, 16, 64])
        b[pos:pos + k] = b[src:src + k]
    elif op == 7:  # random bytes
        k = rng.choice([1, 2, 4, 8])
        b[pos:pos + k] = rng.randbytes(k)
    else:  # append junk
        b += rng.randbytes(rng.choice([1, 7, 8, 12, 64, 4096]))
    return bytes(b)


class Mutator:
    """Structure-aware mutations of packed inputs; ``byte_mutator`` replaces the plain byte
    mutations (the fuzz engine's own, e.g. ``atheris.Mutate``)."""

    def __init__(self, byte_mutator: Callable[[bytes, int], bytes] | None = None,
                 max_size: int = 1 << 20) -> None:
        self.byte_mutator = byte_mutator
        self.max_size = max_size
        self.errors: list[str] = []  # the mutator's own bugs (it falls back to a byte mutation)

    def __call__(self, data: bytes, rng: random.Random) -> bytes:
        files = unpack(data)
        for _ in range(1 + (rng.random() < 0.3) + (rng.random() < 0.1)):
            try:
                files = self._once(files, rng)
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc} at {_where(exc)}")
                k = rng.randrange(len(files)) if files else 0
                files = files or [b""]
                files[k] = mutate_bytes(files[k], rng)
        out = pack(files) if len(files) != 1 or data.startswith(MAGIC) else files[0]
        return out[:self.max_size]

    def _bytes(self, data: bytes, rng: random.Random, lo: int) -> bytes:
        if self.byte_mutator is not None and rng.random() < 0.8:
            head, tail = data[:lo], data[lo:]
            return head + self.byte_mutator(tail, max(len(tail) * 2, 64))
        return mutate_bytes(data, rng, lo)

    def _once(self, files: list[bytes], rng: random.Random) -> list[bytes]:
        if not files:
            return [b""]
        files = list(files)
        k = rng.randrange(len(files))
        f = split(files[k])
        r = rng.random()
        if f is None or r < 0.35:
            files[k] = self._bytes(files[k], rng, f.start if f is not None else 0)
        elif r < 0.75:
            targets = range(len(files)) if len(files) > 1 and rng.random() < 0.35 else [k]
            seed = rng.getrandbits(32)
            for i in targets:  # the same change on every file of the series
                fi = split(files[i])
                if fi is not None:
                    files[i] = self.element(files[i], fi, random.Random(seed))
        elif r < 0.87:
            files[k] = self.meta(files[k], f, rng)
        else:
            files = self.files(files, k, rng)
        return files

    def element(self, data: bytes, f: _File, rng: random.Random) -> bytes:
        """Change, delete, duplicate or add one top-level element of the data set."""
        implicit, little = _encoding(f.transfer_syntax)
        els = elements(data, f)
        known = [e for e in els if e.tag in TAGS]
        op = rng.random()
        if op < 0.55 or not els:  # set a value (the standard VR or another)
            tag = rng.choice(list(TAGS)) if not known or rng.random() < 0.4 else rng.choice(known).tag
            vr = TAGS.get(tag, "UN") if rng.random() < 0.75 else rng.choice(VRS)
            if tag in _PIXEL_TAGS and rng.random() < 0.6:
                return self._pixels(data, f, els, rng)
            new = encode_element(tag, vr, _value_for(vr, rng, little), implicit=implicit, little=little)
            return _put(data, els, tag, new, f.start)
        if op < 0.7:  # delete
            e = rng.choice(known or els)
            return data[:e.start] + data[e.end:]
        if op < 0.8:  # duplicate (the same tag twice) or move out of order
            e = rng.choice(known or els)
            at = rng.choice(els)
            return data[:at.start] + data[e.start:e.end] + data[at.start:]
        if op < 0.9:  # a lying length
            e = rng.choice(known or els)
            if implicit or e.value - e.start == 8:
                off = e.value - 4 if (implicit or e.value - e.start == 12) else e.value - 2
            else:
                off = e.value - 4
            width = e.value - off
            fmt = ("<" if little else ">") + ("I" if width == 4 else "H")
            v = rng.choice(INTS) % (1 << (8 * width))
            return data[:off] + struct.pack(fmt, v) + data[e.value:]
        e = rng.choice(known or els)  # another VR for the same value bytes
        if implicit or e.value - e.start not in (8, 12):
            return data
        value = data[e.value:e.end]
        new = encode_element(e.tag, rng.choice(VRS), value, implicit=False, little=little)
        return data[:e.start] + new + data[e.end:]

    def _pixels(self, data: bytes, f: _File, els: list[_Element], rng: random.Random) -> bytes:
        px = [e for e in els if e.tag in _PIXEL_TAGS]
        if not px:
            return data
        e = px[-1]
        value = data[e.value:e.end]
        op = rng.randrange(5)
        if op == 0:  # fewer bytes (length consistent)
            value = value[:rng.randrange(len(value) + 1)]
        elif op == 1:  # more bytes
            value = value + rng.randbytes(rng.choice([1, 2, 64, len(value) + 1]))
        elif op == 2:  # extreme values
            value = bytes([rng.choice([0x00, 0xFF, 0x7F, 0x80])]) * len(value)
        elif op == 3:  # NaN/inf floats (for float pixel data)
            value = _floats_bytes([rng.choice(FLOATS) for _ in range(len(value) // 4)], 4, True)
        else:  # random
            value = rng.randbytes(len(value))
        implicit, little = _encoding(f.transfer_syntax)
        vr = e.vr if rng.random() < 0.8 else rng.choice(["OB", "OW", "OF", "OD", "UN"])
        if data[e.value - 4:e.value] == b"\xff\xff\xff\xff" and op != 4:
            return data  # encapsulated: leave to the byte mutations
        return data[:e.start] + encode_element(e.tag, vr, value, implicit=implicit, little=little) + \
            data[e.end:]

    def meta(self, data: bytes, f: _File, rng: random.Random) -> bytes:
        """Another transfer syntax, SOP class or Affected SOP Instance in the file meta (the
        data set unchanged): what the sender then proposes and announces."""
        ts, sop, inst = f.transfer_syntax, f.sop_class, f.sop_instance
        r = rng.random()
        if r < 0.6:
            ts = rng.choice(TRANSFER_SYNTAXES)
        elif r < 0.85:
            sop = rng.choice(SOP_CLASSES)
        else:
            inst = rng.choice(UIDS[8:]) or "1.2"
        return part10_prefix(sop, inst, ts, None) + data[f.start:]

    def files(self, files: list[bytes], k: int, rng: random.Random) -> list[bytes]:
        """Drop, duplicate, reorder or cut a file of the association."""
        op = rng.randrange(4)
        if op == 0 and len(files) > 1:
            del files[k]
        elif op == 1 and len(files) < 48:
            files.insert(rng.randrange(len(files) + 1), files[k])
        elif op == 2 and len(files) > 1:
            rng.shuffle(files)
        else:
            f = split(files[k])
            els = elements(files[k], f) if f is not None else []
            if els:  # cut at an element boundary, or a few bytes around it
                e = rng.choice(els)
                cut = max(0, e.start + rng.choice([0, 0, 1, 2, 4, 6, 8, 10, -1, -2]))
                files[k] = files[k][:cut]
            else:
                files[k] = files[k][:rng.randrange(len(files[k]) + 1)]
        return files


def _put(data: bytes, els: list[_Element], tag: int, new: bytes, start: int) -> bytes:
    """Replace the element ``tag`` with ``new``, or insert ``new`` in tag order."""
    for e in els:
        if e.tag == tag:
            return data[:e.start] + new + data[e.end:]
    for e in els:
        if e.tag > tag:
            return data[:e.start] + new + data[e.start:]
    end = els[-1].end if els else start
    return data[:end] + new + data[end:]


# --------------------------------------------------------------------------- seeds


def seed_corpus(*, badinput_cases: bool = True, max_bytes: int = 256 * 1024) -> dict[str, bytes]:
    """Valid studies of the project's own generators and the bad-input corpus, as inputs.

    ``phantom-cxr``/``phantom-head-ct``/``phantom-chest-ct``: the product's phantom writer
    (``triage.phantom_dicom``, via ``tests/badinput.py``); ``dicomgen-*``: ``tests/dicomgen.py``;
    ``badinput-<id>``: every case of ``tests/badinput.py`` (its files in sending order), the
    ones over ``max_bytes`` left out.
    """
    import badinput
    import dicomgen

    out = {
        "phantom-cxr": pack(badinput._files("cxr")),
        "phantom-head-ct": pack(badinput._files("head")),
        "phantom-chest-ct": pack(badinput._files("chest")),
        "phantom-head-ct-slice": badinput._files("head")[5],
        # 40 x 40 x 50 mm: at least half a patch of the chest-CT model along every axis
        "dicomgen-chest-ct": pack(dicomgen.ct_series("fuzz-ct", 25, rows=40, cols=40)),
        "dicomgen-cr": dicomgen.cr_image("fuzz-cr"),
        "dicomgen-dx": dicomgen.cr_image("fuzz-dx", modality="DX", sop_class=dicomgen.DX_PRESENTATION,
                                         rows=32, cols=32),
    }
    if badinput_cases:
        for c in badinput.cases():
            data = pack([s.data for s in c.sends])
            if len(data) <= max_bytes:
                out[f"badinput-{c.id}"] = data
    return out


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:12]


def save_reproducer(data: bytes, folder: Path, name: str) -> Path:
    """``<name>.fuzz`` (the input) and ``<name>/NN.dcm`` (its files, to send with any tool)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.fuzz"
    path.write_bytes(data)
    sub = folder / name
    sub.mkdir(exist_ok=True)
    for i, f in enumerate(unpack(data)):
        (sub / f"{i:02d}.dcm").write_bytes(f)
    return path

