"""Reception speed: the node's storage SCP against dcmtk's ``storescp``, images/s and the ratio.

    .venv/bin/python bench/ingest.py [--repeat 3] [--n 300] [--postgres] [--bare] [--no-assembler]

One 300-slice 512x512 CT series (CT Image Storage, 16-bit signed, explicit VR little
endian, uncompressed, about 157 MB; generated with pydicom once and cached under
``/tmp/triage-bench-ingest``) is sent by dcmtk's ``storescu`` (``+sd`` on the folder, one
association) to each receiver in turn, ``--repeat`` times, the order rotating each round:

* ``storescp``: dcmtk's ``storescp`` (no ``--fork``, ``-od`` a fresh folder; it does not
  fsync, so this is the rate of a receiver without durability);
* ``node``: the node's SCP (:class:`triage.receive.StorageSCP`) in its own process, started
  as ``triage serve`` starts it (:func:`triage.serve.run_scp` in a ``spawn`` process), with
  durability on (``storage.fsync = true``: every instance fsynced and indexed before its
  acknowledgement), a fresh data folder and a freshly migrated SQLite database each run;
  and the node's quiet-period Assembler running in this process, as in ``triage serve``
  (``--no-assembler`` leaves it out);
* ``node-pg`` (``--postgres``): the same with PostgreSQL: a fresh database
  ``bench_ingest_<random>`` is created on ``--postgres-url`` for each run and dropped after;
* ``bare`` (``--bare``, a reference): a bare pynetdicom C-STORE handler in a ``spawn``
  process, each data set written to a file without fsync or a database (the issue's
  "about 0.22 of storescp" point).

``TCP_NODELAY=1`` is set for ``storescu``, ``storescp`` and the node's process (which also
sets the socket option itself). Before each send the page cache is synced (``os.sync``), so
that one receiver's unwritten files are not flushed during the next one's run; the input
files are read once beforehand, so every send reads them from the cache.

Measured: the wall time of the ``storescu`` process (association, 300 C-STOREs, release),
as images/s and MB/s, and the receiver process's CPU seconds over it. For the node, the
time from the end of ``storescu`` (after the release) to the series's Job being visible
in the database (polled every 5 ms from another connection), and from the last instance's
``received_at`` to ``Job.created_at`` (both set by the node). Goals (the issue): node
images/s >= 0.5 of storescp's, and the Job queued <= 1 s after release. Reported: the median
over the repeats, a table and one JSON line. Every run is checked: all instances stored
(files for storescp; current Instance rows for the node) and the Job present.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# The repository first (bench/flows.py must not shadow the flows package), bench/ last (netkit)
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH.parent), *(p for p in sys.path if Path(p or ".").resolve() != _BENCH), str(_BENCH)]

import numpy as np  # noqa: E402
from netkit import free_port, listening, run_storescu, tcp_env  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom.transport import ThreadedAssociationServer  # noqa: E402
from sqlalchemy import create_engine, func, select  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from storage.db import normalise_url  # noqa: E402
from storage.models import Instance, Job, Series  # noqa: E402
from triage.assemble import Assembler  # noqa: E402
from triage.config import load_settings  # noqa: E402
from triage.serve import prepare_database, run_scp  # noqa: E402

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
CACHE = Path("/tmp/triage-bench-ingest")
SIZE = 512
STORESCP_AET = "STORESCP"
BARE_AET = "BARE"


# --------------------------------------------------------------------------- the series

def _phantom(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A chest-like slice in HU (body, two lungs, a spine) and a noise field to vary per slice."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cy, cx = SIZE / 2, SIZE / 2
    hu = np.full((SIZE, SIZE), -1000.0, dtype=np.float32)
    body = ((xx - cx) / 220) ** 2 + ((yy - cy) / 160) ** 2 <= 1
    hu[body] = 40
    for lx in (cx - 95, cx + 95):
        hu[((xx - lx) / 75) ** 2 + ((yy - cy + 10) / 110) ** 2 <= 1] = -850
    hu[((xx - cx) / 22) ** 2 + ((yy - cy - 115) / 22) ** 2 <= 1] = 700
    noise = rng.normal(0, 12, (SIZE, SIZE)).astype(np.float32)
    return hu, noise


def make_series(folder: Path, n: int) -> None:
    """Write ``n`` axial 512x512 CT slices (1 mm apart) as CT000001.dcm ... into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240601)
    base, noise = _phantom(rng)
    seed = f"triage-bench-ingest-{n}"
    study, series, frame = (generate_uid(entropy_srcs=[seed, what]) for what in ("study", "series", "frame"))
    x0 = y0 = -(SIZE - 1) / 2 * 0.7
    for k in range(n):
        sop = generate_uid(entropy_srcs=[seed, "instance", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240601"
        ds.StudyTime = ds.SeriesTime = "101500"
        ds.AcquisitionTime = ds.ContentTime = f"1016{k % 60:02d}"
        ds.AccessionNumber = "BENCH0001"
        ds.Modality = "CT"
        ds.Manufacturer = "BENCH"
        ds.InstitutionName = "Bench Hospital"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT CHEST"
        ds.SeriesDescription = "Chest axial 1.0"
        ds.PatientName = "BENCH^INGEST"
        ds.PatientID = "BENCH-INGEST"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = "1.0"
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        z = -150.0 + k * 1.0
        ds.ImagePositionPatient = [f"{x0:.2f}", f"{y0:.2f}", f"{z:.1f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.1f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = SIZE
        ds.PixelSpacing = ["0.7", "0.7"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        hu = base + np.roll(noise, 7 * k, axis=k % 2) + 30 * np.sin(k / 25)
        ds.PixelData = np.clip(np.rint(hu + 1024), -32768, 32767).astype("<i2").tobytes()
        ds["PixelData"].VR = "OW"
        ds.save_as(folder / f"CT{k + 1:06d}.dcm", enforce_file_format=True)


def cached_series(n: int) -> Path:
    folder = CACHE / f"ct-{n}x{SIZE}"
    done = CACHE / f"ct-{n}x{SIZE}.complete"  # outside the folder: storescu +sd sends every file
    if not done.exists() or len(list(folder.glob("*.dcm"))) != n:
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        make_series(folder, n)
        done.write_text("ok\n")
        print(f"generated {n} slices in {folder} ({time.perf_counter() - t:.1f} s)")
    return folder


# --------------------------------------------------------------------------- helpers

def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def storescu(folder: Path, port: int, aec: str, log: Path) -> tuple[float, float]:
    """Send every file in ``folder``; returns (seconds, wall-clock time at its end)."""
    return run_storescu(["-aec", aec, "+sd", "127.0.0.1", str(port), str(folder)], log)


def _read_all(folder: Path) -> int:
    return sum(len(p.read_bytes()) for p in sorted(folder.glob("*.dcm")))


# --------------------------------------------------------------------------- receivers

def run_storescp(folder: Path, n: int, nbytes: int, work: Path, keep: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="storescp-", dir=work))
    out = tmp / "out"
    out.mkdir()
    log = tmp / "log.txt"
    port = free_port()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(["storescp", "-aet", STORESCP_AET, "-od", str(out), str(port)],
                                env=tcp_env(), stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"storescp did not start; see {log}")
            time.sleep(0.02)
        os.sync()
        cpu0 = _cpu_s(proc.pid)
        secs, _ = storescu(folder, port, STORESCP_AET, log)
        cpu = _cpu_s(proc.pid) - cpu0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stored = sum(1 for p in out.iterdir() if p.is_file())
    if stored != n:
        raise RuntimeError(f"storescp stored {stored} of {n} files; see {log}")
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"receiver": "storescp", "seconds": secs, "images_s": n / secs, "mb_s": nbytes / secs / 1e6,
            "cpu_s": cpu}


class _NoDelayServer(ThreadedAssociationServer):
    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr


def _bare_scp(out: str, ready: Any) -> None:
    """A bare pynetdicom C-STORE handler: each data set to a file, no fsync, no database."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    counter = itertools.count()

    def on_store(event: Any) -> int:
        with open(os.path.join(out, f"{next(counter):06d}.dcm"), "wb") as fh:
            fh.write(event.encoded_dataset(include_meta=True))
        return 0x0000

    ae = AE(ae_title=BARE_AET)
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = 0
    server = ae.make_server(("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_STORE, on_store)],
                            server_class=_NoDelayServer)
    ae._servers.append(server)  # as AE.start_server does (and StorageSCP.start): shutdown() stops it
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ready.put(int(server.server_address[1]))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    ae.shutdown()


def run_bare(folder: Path, n: int, nbytes: int, work: Path, keep: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bare-", dir=work))
    out = tmp / "out"
    out.mkdir()
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=_bare_scp, args=(str(out), ready), name="bare-scp", daemon=True)
    proc.start()
    try:
        port = int(ready.get(timeout=120))
        assert proc.pid is not None
        os.sync()
        cpu0 = _cpu_s(proc.pid)
        secs, _ = storescu(folder, port, BARE_AET, tmp / "storescu.txt")
        cpu = _cpu_s(proc.pid) - cpu0
    finally:
        if proc.pid is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    stored = sum(1 for p in out.iterdir() if p.is_file())
    if stored != n:
        raise RuntimeError(f"the bare handler stored {stored} of {n} files")
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"receiver": "bare", "seconds": secs, "images_s": n / secs, "mb_s": nbytes / secs / 1e6,
            "cpu_s": cpu}


def _pg_database(admin_url: str) -> tuple[str, str]:
    """Create ``bench_ingest_<random>`` next to ``admin_url``'s database; (name, its URL)."""
    import psycopg
    from psycopg import sql

    name = f"bench_ingest_{secrets.token_hex(4)}"
    with psycopg.connect(_libpq(admin_url), autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _pg_drop(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(_libpq(admin_url), autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def run_node(folder: Path, n: int, nbytes: int, work: Path, keep: bool, *, pg_admin: str | None,
             assembler: bool, job_timeout: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="node-", dir=work))
    log = tmp / "storescu.txt"
    pg_name = None
    storage: dict[str, Any] = {"fsync": True}
    if pg_admin is not None:
        pg_name, storage["database_url"] = _pg_database(pg_admin)
    proc = None
    asm = None
    db = None
    watch = None
    ok = False
    try:
        settings = load_settings(node={"data_dir": str(tmp / "data")},
                                 receive={"host": "127.0.0.1", "port": 0}, storage=storage)
        if not settings.storage.fsync:
            raise RuntimeError("storage.fsync is off; this benchmark measures with durability on")
        db = prepare_database(settings)  # migrate before the SCP starts, as Node does
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        proc = ctx.Process(target=run_scp, args=(settings, logging.WARNING, ready), name="scp", daemon=True)
        proc.start()
        port = int(ready.get(timeout=120))
        assert proc.pid is not None
        if assembler:
            asm = Assembler(db, settings).start()
        # Polls from a plain engine (no BEGIN IMMEDIATE), so reading never takes SQLite's write lock.
        watch = create_engine(normalise_url(settings.database_url))
        os.sync()
        cpu0 = _cpu_s(proc.pid)
        secs, end = storescu(folder, port, settings.receive.ae_title, log)
        cpu = _cpu_s(proc.pid) - cpu0
        job_seen = None
        row = None
        deadline = time.monotonic() + job_timeout
        while time.monotonic() < deadline:
            with watch.connect() as c:
                row = c.execute(select(Job.id, Job.created_at, Job.kind, Job.series_id)).first()
            if row is not None:
                job_seen = time.time()
                break
            time.sleep(0.005)
        cpu_after = _cpu_s(proc.pid) - cpu0
        with watch.connect() as c:
            stored = c.execute(select(func.count()).select_from(Instance)
                               .where(Instance.current.is_(True))).scalar_one()
            last_rx = c.execute(select(func.max(Instance.received_at))).scalar_one()
            ser = c.execute(select(Series.state, Series.completion_reason, Series.kind)).first()
        if stored != n:
            raise RuntimeError(f"the node stored {stored} of {n} instances; see {log} and the SCP's log")
        if row is None:
            raise RuntimeError(f"no Job {job_timeout:g} s after the release (series: {ser})")
        # received_at comes back as an aware UTC datetime from the model's column type
        ok = True
        res = {"receiver": "node-pg" if pg_admin else "node", "seconds": secs, "images_s": n / secs,
               "mb_s": nbytes / secs / 1e6, "cpu_s": cpu, "cpu_to_job_s": cpu_after,
               "release_to_job_s": job_seen - end if job_seen else None,
               "release_to_created_s": row[1].timestamp() - end,
               "last_received_to_created_s": (row[1] - last_rx).total_seconds() if last_rx else None,
               "job_kind": row[2], "completion": ser[1] if ser else None}
        return res
    finally:
        if watch is not None:
            watch.dispose()
        if asm is not None:
            asm.stop()
        if proc is not None and proc.pid is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if db is not None:
            db.dispose()
        if pg_name is not None and pg_admin is not None:
            _pg_drop(pg_admin, pg_name)
        if ok and not keep:  # on failure the folder (logs, data) stays for a look
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- main

def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per receiver (median reported)")
    ap.add_argument("--n", type=int, default=300, help="slices in the series")
    ap.add_argument("--postgres", action="store_true", help="also the node with PostgreSQL")
    ap.add_argument("--bare", action="store_true",
                    help="also a bare pynetdicom handler (file per instance, no fsync, no database)")
    ap.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="an existing database to connect to for CREATE/DROP DATABASE")
    ap.add_argument("--no-assembler", dest="assembler", action="store_false",
                    help="leave out the quiet-period Assembler (early finish only)")
    ap.add_argument("--job-timeout", type=float, default=30.0, help="seconds to wait for the Job")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where receivers write (default: a temp folder under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the received files and databases' folders")
    args = ap.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} (dcmtk) is not on PATH")
    os.environ["TCP_NODELAY"] = "1"  # the node's process inherits it (it also sets the socket option)

    folder = cached_series(args.n)
    nbytes = _read_all(folder)  # also warms the page cache: every send reads from memory
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.workdir))
    receivers = ["storescp", "node"]
    receivers += (["node-pg"] if args.postgres else []) + (["bare"] if args.bare else [])
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in receivers}
    print(f"\n{args.n} x {SIZE}x{SIZE} CT slices ({nbytes / 1e6:.1f} MB) by storescu, one association; "
          f"{os.cpu_count()} CPUs; node with fsync on, "
          f"{'with' if args.assembler else 'without'} the Assembler\n")
    print("| round | receiver | seconds | images/s | MB/s | receiver CPU s | release -> Job visible s "
          "| last received_at -> Job.created_at s |")
    print("|---|---|---|---|---|---|---|---|")
    ok = False
    try:
        for i in range(args.repeat):
            order = receivers[i % len(receivers):] + receivers[:i % len(receivers)]
            for rec in order:
                if rec == "storescp":
                    r = run_storescp(folder, args.n, nbytes, work, args.keep)
                elif rec == "bare":
                    r = run_bare(folder, args.n, nbytes, work, args.keep)
                else:
                    r = run_node(folder, args.n, nbytes, work, args.keep,
                                 pg_admin=args.postgres_url if rec == "node-pg" else None,
                                 assembler=args.assembler, job_timeout=args.job_timeout)
                r["round"] = i + 1
                runs[rec].append(r)
                lat = r.get("release_to_job_s")
                lrx = r.get("last_received_to_created_s")
                print(f"| {i + 1} | {rec} | {r['seconds']:.2f} | {r['images_s']:.1f} | {r['mb_s']:.0f} "
                      f"| {r['cpu_s']:.2f} | {'' if lat is None else f'{lat:.3f}'} "
                      f"| {'' if lrx is None else f'{lrx:.3f}'} |", flush=True)
        ok = True
    finally:
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            print(f"left {work} for a look (logs of the failed run)", file=sys.stderr)

    base = _median(runs["storescp"], "images_s")
    summary: dict[str, Any] = {"bench": "ingest", "n": args.n, "size": SIZE, "mb": round(nbytes / 1e6, 1),
                               "repeat": args.repeat, "cpus": os.cpu_count(), "fsync": True,
                               "assembler": args.assembler, "goal_ratio": 0.5, "goal_latency_s": 1.0,
                               "storescp_images_s": round(base, 2) if base else None}
    print(f"\nmedian of {args.repeat}:\n")
    print("| receiver | images/s | ratio to storescp | release -> Job visible s | completion |")
    print("|---|---|---|---|---|")
    print(f"| storescp | {base:.1f} | 1 | | |")
    for rec in receivers[1:]:
        ips = _median(runs[rec], "images_s")
        lat = _median(runs[rec], "release_to_job_s")
        lrx = _median(runs[rec], "last_received_to_created_s")
        ratio = ips / base if ips and base else None
        how = sorted({str(r["completion"]) for r in runs[rec] if r.get("completion")})
        goal = " (reference)" if rec == "bare" else f" ({'meets' if ratio and ratio >= 0.5 else 'below'} 0.5)"
        late = "" if lat is None else f"{lat:.3f} ({'meets' if lat <= 1 else 'above'} 1 s)"
        print(f"| {rec} | {ips:.1f} | {ratio:.2f}{goal} | {late} | {'; '.join(how)} |")
        key = rec.replace("-", "_")
        summary.update({f"{key}_images_s": round(ips, 2) if ips else None,
                        f"{key}_ratio": round(ratio, 3) if ratio else None})
        if rec != "bare":
            summary.update({f"{key}_release_to_job_s": round(lat, 3) if lat is not None else None,
                            f"{key}_last_received_to_created_s": round(lrx, 3) if lrx is not None else None,
                            f"{key}_completion": how})
    summary["runs"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                       for rec in receivers for r in runs[rec]]
    print()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
