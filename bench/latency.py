"""Result latency: the last instance's acknowledgement -> the SR and SEG accepted by the PACS.

    .venv/bin/python bench/latency.py [--n 20] [--kinds cxr,bct,chestct] [--presets cpu|paper]
                                      [--cxr-size 1024] [--headct-shape 24x512x512]
                                      [--chestct-shape 120x160x160] [--n-chestct N] [--poll S]
                                      [--jitter 1.0] [--timeout 600] [--workdir DIR] [--keep]

The node runs as ``triage serve`` runs it (:class:`triage.serve.Node`: the storage SCP in
its own ``spawn`` process; the assembler, the local executor and the delivery loop in this
process) with its default settings (durability on, early finish at release, executor poll
0.5 s, dispatch poll 1 s; ``--poll`` sets both polls), a fresh data folder and one bundle per
kind. The PACS is dcmtk's ``storescp`` (``-od`` a fresh folder), whose
``--exec-on-reception`` appends ``date +%s.%N`` and the file's path to a log after each
object is written (before its C-STORE response goes back): that time is "accepted by the
PACS".

Each series (one study) is sent by dcmtk's ``storescu`` (``TCP_NODELAY=1``, one association)
to the node; t0 = the ``storescu`` process's exit (after its last C-STORE response and the
release). t1 = the arrival at the PACS of the last of the result's objects (the SR and
every SEG the node built for it: the node's ``Result.outputs``, matched to received files by
SOP Instance UID and checked to carry the series's StudyInstanceUID). Latency = t1 - t0.
Series are sent one after another: the next one only once the previous one's objects are
all at the PACS, after a pause of 0.2 s plus a random 0..``--jitter`` s (default 1 s, seeded):
with a fixed pause the sends lock to the phase of the node's poll loops (executor 0.5 s,
dispatch 1 s) and the latencies bunch at a few values. The first series of each kind is a
warm-up (the bundle is loaded and highdicom imported on first use) and is reported apart
("cold"), not in the statistics.

Data (generated once, cached under ``/tmp/triage-bench-latency``): phantom studies written
as DICOM by :func:`triage.phantom_dicom.write_dicom_studies`, every other one abnormal:

* ``cxr``: DX For Presentation, ``--cxr-size`` square (default 1024, 0.39 mm pixels);
* ``bct``: head CT, ``--headct-shape`` D x H x W (default 24 x 512 x 512: 4.6 mm slices);
* ``chestct``: chest CT, ``--chestct-shape`` on an isotropic 2 mm grid (default 120 x 160 x
  160; the router sends chest CT only with slices <= 3 mm and >= 20 slices).

Bundles (built once, cached): ``--presets cpu`` = cpu-cxr, cpu-bct (whole-image models)
and cpu-chestct (patch map); ``--presets paper`` = paper-cxr, paper-bct and ct3dflow, only
with a CUDA GPU. They are trained for 1 epoch (+ 1 fine-tuning epoch) on a few dozen
phantoms: the inference cost, which is all latency measures, depends on the preset's
architecture and the input size, not on how long the models were trained; their scores
mean nothing here.

Reported per kind: n, median, p95 (linear interpolation), max of the latency, the goal
(the issue, for a 2-core CPU machine: CXR <= 3 s, head CT <= 10 s, chest CT <= 30 s; the
goals are checked against the median and the p95), and the median of the node's own stages
from its database: release -> series complete, complete -> job started (executor poll),
analysis (of which read and score, ``Result.details.timings_s``), report building (SR/SEG,
until the Delivery rows exist), delivery (dispatch poll, association, C-STORE). A table and
one JSON line at the end. The machine note (CPU, cores, load, other pytest processes at the
start and the end) is printed with the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The repository first (bench/flows.py must not shadow the flows package), bench/ last (netkit)
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH.parent), *(p for p in sys.path if Path(p or ".").resolve() != _BENCH), str(_BENCH)]

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from netkit import free_port, listening, run_storescu, tcp_env  # noqa: E402
from sqlalchemy import select  # noqa: E402

from storage.models import Delivery, Job, Result, Series  # noqa: E402
from triage.config import load_settings  # noqa: E402
from triage.serve import Node  # noqa: E402

CACHE = Path("/tmp/triage-bench-latency")
PACS_AET = "PACS"
KINDS = ("cxr", "bct", "chestct")
GOALS_S = {"cxr": 3.0, "bct": 10.0, "chestct": 30.0}
LABELS = {"cxr": "CXR", "bct": "head CT", "chestct": "chest CT"}
PRESETS = {"cpu": {"cxr": "cpu-cxr", "bct": "cpu-bct", "chestct": "cpu-chestct"},
           "paper": {"cxr": "paper-cxr", "bct": "paper-bct", "chestct": "ct3dflow"}}
STUDY_SEED = {"cxr": 1000, "bct": 2000, "chestct": 3000}
CHEST_SPACING_MM = 2.0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected D x H x W, e.g. 24x512x512, got {text!r}")
    return parts[0], parts[1], parts[2]


# --------------------------------------------------------------------------- studies

def _study_tag(kind: str, args: argparse.Namespace) -> str:
    if kind == "cxr":
        return f"cxr-{args.cxr_size}"
    if kind == "bct":
        return "bct-" + "x".join(map(str, args.headct_shape))
    return "chestct-" + "x".join(map(str, args.chestct_shape)) + f"-{CHEST_SPACING_MM:g}mm"


def _make_case(kind: str, args: argparse.Namespace, seed: int, abnormal: bool) -> Any:
    ab = 1.0 if abnormal else 0.0
    if kind == "cxr":
        from flows.phantoms import make_cxr

        return make_cxr(1, size=args.cxr_size, abnormal_fraction=ab, seed=seed)
    if kind == "bct":
        from flows.phantoms import make_headct

        return make_headct(1, shape=args.headct_shape, abnormal_fraction=ab, seed=seed)
    from flows.phantoms.chestct import make_chestct

    return make_chestct(1, shape=args.chestct_shape, spacing_mm=CHEST_SPACING_MM, abnormal_fraction=ab,
                        seed=seed)


@dataclass
class Study:
    kind: str
    index: int
    folder: Path  # the series's .dcm files
    study_uid: str
    series_uid: str
    abnormal: bool
    files: int


def cached_studies(kind: str, count: int, args: argparse.Namespace) -> list[Study]:
    """``count`` single-series studies of ``kind`` (case i: seed base + i, abnormal when i is odd)."""
    root = CACHE / "studies" / _study_tag(kind, args)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    t = time.perf_counter()
    made = 0
    for i in range(count):
        case = root / f"{i:03d}"
        done = root / f"{i:03d}.complete"  # outside the folder: storescu sends every .dcm in it
        if not done.exists():
            shutil.rmtree(case, ignore_errors=True)
            seed = STUDY_SEED[kind] + i
            ps = _make_case(kind, args, seed, abnormal=i % 2 == 1)
            from triage.phantom_dicom import write_dicom_studies

            write_dicom_studies(ps, case, seed=seed)
            done.write_text("ok\n")
            made += 1
        with open(case / "labels.csv") as fh:
            head, row = fh.read().splitlines()[:2]
        rec = dict(zip(head.split(","), row.split(","), strict=True))
        folder = case / rec["case"]
        out.append(Study(kind, i, folder, rec["study_instance_uid"], rec["series_instance_uid"],
                         rec["label"] == "1", len(list(folder.glob("*.dcm")))))
    if made:
        _say(f"generated {made} {kind} studies in {root} ({time.perf_counter() - t:.1f} s)")
    return out


# --------------------------------------------------------------------------- bundles

EPOCHS = 1
FINETUNE_EPOCHS = 1


def _build_whole(out: Path, preset_name: str, device: str | None, log: Callable[[str], None]) -> None:
    from flows.build import BuildOptions, build_bundle
    from flows.presets import get_preset

    preset = get_preset(preset_name)
    prep = preset.preprocessing
    if prep.kind == "cxr":
        from flows.phantoms import make_cxr

        def gen(n: int, ab: float, seed: int) -> Any:
            return make_cxr(n, size=int(prep.shape[-1]), abnormal_fraction=ab, seed=seed)
    else:
        from flows.phantoms import make_headct

        def gen(n: int, ab: float, seed: int) -> Any:
            return make_headct(n, shape=tuple(prep.shape), abnormal_fraction=ab, seed=seed)  # type: ignore[arg-type]
    normal = prep.apply(gen(32, 0.0, 11).images)
    mixture = prep.apply(gen(32, 0.5, 12).images)
    v = gen(24, 0.5, 13)
    build_bundle(out, preset=preset, normal=normal, mixture=mixture, name=f"bench-{preset.name}",
                 options=BuildOptions(progress=False, epochs=EPOCHS, finetune_epochs=FINETUNE_EPOCHS,
                                      device=device),
                 validation=(prep.apply(v.images), np.asarray(v.labels)), log=log)


def _build_patch(out: Path, preset_name: str, device: str | None, log: Callable[[str], None]) -> None:
    from flows.build import BuildOptions
    from flows.patchbundle import build_patch_bundle
    from flows.phantoms import PhantomSet
    from flows.phantoms.chestct import make_chestct
    from flows.presets import get_preset

    preset = get_preset(preset_name)
    shape = (64, 96, 96)  # 2 mm: a field of view of 128 x 192 x 192 mm, a small chest

    def phantoms(n: int, ab: float, seed: int) -> PhantomSet:
        return make_chestct(n, shape=shape, spacing_mm=CHEST_SPACING_MM, abnormal_fraction=ab, seed=seed)

    val = phantoms(8, 0.5, 23)
    build_patch_bundle(out, preset=preset, normal=phantoms(6, 0.0, 21).volumes(),
                       mixture=phantoms(6, 0.5, 22).volumes(),
                       validation=(val.volumes(), np.asarray(val.labels)), name=f"bench-{preset.name}",
                       options=BuildOptions(progress=False, epochs=EPOCHS, finetune_epochs=FINETUNE_EPOCHS,
                                            device=device), log=log)


def cached_bundle(kind: str, preset_name: str, device: str | None) -> Path:
    from flows.bundle import load_bundle

    out = CACHE / "bundles" / f"{preset_name}-e{EPOCHS}"
    if out.exists():
        try:
            load_bundle(out, device="cpu")
            return out
        except Exception as exc:  # an interrupted or stale build: make it again
            _say(f"cached bundle {out} unusable ({exc}); rebuilding")
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    _say(f"building the {kind} bundle ({preset_name}, {EPOCHS} epoch + {FINETUNE_EPOCHS} fine-tuning "
         f"epoch on phantoms) in {out}")
    build = _build_patch if kind == "chestct" else _build_whole
    build(tmp, preset_name, device, lambda s: _say(f"  {s}"))
    tmp.rename(out)
    load_bundle(out, device="cpu")
    _say(f"  built in {time.perf_counter() - t:.0f} s")
    return out


# --------------------------------------------------------------------------- the PACS

@dataclass
class Arrival:
    t: float
    path: Path
    study_uid: str
    sop_uid: str
    modality: str


class Pacs:
    """dcmtk's storescp; every received object is logged with its arrival time."""

    def __init__(self, work: Path) -> None:
        self.out = work / "pacs"
        self.out.mkdir(parents=True)
        self.log = work / "pacs-received.log"
        self.log.touch()
        self.console = work / "storescp.txt"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._partial = b""
        self.by_sop: dict[str, Arrival] = {}

    def start(self) -> Pacs:
        # #p/#f: the file just written; storescp runs this through /bin/sh after writing the file
        cmd = f'printf "%s %s\\n" "$(date +%s.%N)" "#p/#f" >> {self.log}'
        with open(self.console, "ab") as fh:
            self.proc = subprocess.Popen(["storescp", "-aet", PACS_AET, "-od", str(self.out),
                                          "--exec-on-reception", cmd, str(self.port)],
                                         env=tcp_env(), stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"storescp did not start; see {self.console}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def poll(self) -> list[Arrival]:
        """Objects logged since the last call (read from the files storescp wrote)."""
        with open(self.log, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an unfinished line (the shell is still writing it)
        new = []
        for line in lines:
            if not line.strip():
                continue
            ts, path = line.decode().split(" ", 1)
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["StudyInstanceUID", "SOPInstanceUID", "Modality"])
            a = Arrival(float(ts), Path(path), str(ds.StudyInstanceUID), str(ds.SOPInstanceUID),
                        str(ds.Modality))
            self.by_sop[a.sop_uid] = a
            new.append(a)
        return new


# --------------------------------------------------------------------------- one series

def storescu(study: Study, port: int, log: Path) -> tuple[float, float]:
    """Send the study's files in one association; returns (seconds, wall-clock time at the exit)."""
    return run_storescu(["-aet", "BENCH", "-aec", "TRIAGE", "+sd", "+r", "+sp", "*.dcm", "127.0.0.1",
                         str(port), str(study.folder)], log)


@dataclass
class Run:
    kind: str
    index: int
    cold: bool
    abnormal: bool
    instances: int
    send_s: float
    latency_s: float
    objects: dict[str, int]
    stages: dict[str, float] = field(default_factory=dict)
    node: dict[str, Any] = field(default_factory=dict)


def _ts(x: Any) -> float | None:
    return None if x is None else float(x.timestamp())


def _node_state(node: Node, series_uid: str) -> tuple[Series | None, Job | None, Result | None,
                                                       list[Delivery]]:
    with node.db.sessions() as s:
        se = s.scalars(select(Series).where(Series.series_instance_uid == series_uid)).first()
        if se is None:
            return None, None, None, []
        job = s.scalars(select(Job).where(Job.series_id == se.id).order_by(Job.id.desc())).first()
        res = s.scalars(select(Result).where(Result.series_id == se.id)
                        .order_by(Result.version.desc())).first()
        dels = list(s.scalars(select(Delivery).where(Delivery.result_id == res.id))) if res else []
        return se, job, res, dels


def measure(node: Node, pacs: Pacs, study: Study, work: Path, timeout: float, cold: bool) -> Run:
    assert node.port is not None
    send_s, t0 = storescu(study, node.port, work / "storescu.txt")
    deadline = time.monotonic() + timeout
    next_db = 0.0
    expected: set[str] | None = None
    while True:
        pacs.poll()
        got = {a.modality for a in pacs.by_sop.values() if a.study_uid == study.study_uid}
        now = time.monotonic()
        if {"SR", "SEG"} <= got or now >= next_db:
            # the result's objects (SR + every SEG), once its reports are built
            se, job, res, _ = _node_state(node, study.series_uid)
            next_db = now + 0.5
            if job is not None and job.state == "failed":
                raise RuntimeError(f"{study.kind} study {study.index}: the job failed: {job.reason}")
            if se is not None and se.state == "ignored":
                raise RuntimeError(f"{study.kind} study {study.index}: the series was not routed "
                                   f"({se.route_reason})")
            if res is not None and res.report_state == "failed":
                raise RuntimeError(f"{study.kind} study {study.index}: reports failed: {res.report_error}")
            if res is not None and res.report_state == "ready":
                expected = {o["sop_instance"] for o in res.outputs or []}
        if expected and expected <= pacs.by_sop.keys():
            break
        if time.monotonic() > deadline:
            se, job, res, dels = _node_state(node, study.series_uid)
            raise RuntimeError(
                f"{study.kind} study {study.index}: SR and SEG not at the PACS {timeout:g} s after the "
                f"release (series {se.state if se else None}, job {job.state if job else None}, "
                f"result {res.report_state if res else None}, deliveries {[d.state for d in dels]}, "
                f"at the PACS {sorted(got)})")
        time.sleep(0.005)
    arrivals = [pacs.by_sop[u] for u in expected]
    wrong = [a.path.name for a in arrivals if a.study_uid != study.study_uid]
    if wrong:
        raise RuntimeError(f"{study.kind} study {study.index}: results in another study: {wrong}")
    mods = [a.modality for a in arrivals]
    if "SR" not in mods or "SEG" not in mods:
        raise RuntimeError(f"{study.kind} study {study.index}: the result has {sorted(mods)}, "
                           "not an SR and a SEG")
    t1 = max(a.t for a in arrivals)
    se, job, res, dels = _node_state(node, study.series_uid)
    assert se is not None and job is not None and res is not None
    timings = (res.details or {}).get("timings_s", {})
    t_complete, t_started, t_result = _ts(se.completed_at), _ts(job.started_at), _ts(res.created_at)
    t_planned = max((_ts(d.created_at) or 0.0) for d in dels) if dels else None
    stages: dict[str, float] = {}
    if None not in (t_complete, t_started, t_result, t_planned):
        stages = {"complete": t_complete - t0, "queued": t_started - t_complete,  # type: ignore[operator]
                  "analysis": t_result - t_started,  # type: ignore[operator]
                  "read": float(timings.get("read", float("nan"))),
                  "score": float(timings.get("score", float("nan"))),
                  "reports": t_planned - t_result, "delivery": t1 - t_planned}  # type: ignore[operator]
    return Run(kind=study.kind, index=study.index, cold=cold, abnormal=study.abnormal,
               instances=study.files, send_s=send_s, latency_s=t1 - t0,
               objects={m: mods.count(m) for m in sorted(set(mods))}, stages=stages,
               node={"completion": se.completion_reason, "route": se.route_reason, "method": res.method,
                     "priority": res.priority, "shape": (res.details or {}).get("shape"),
                     "deliveries": [d.state for d in dels]})


# --------------------------------------------------------------------------- the machine

def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _other_pytests() -> list[str]:
    """pytest processes on this machine (another CI run competes for the CPUs)."""
    found = []
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        with contextlib.suppress(OSError):
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if "pytest" in cmd and "latency.py" not in cmd:
                found.append(f"{d.name} in {os.readlink(d / 'cwd')}: {cmd[:80]}")
    return sorted(found)


def _machine() -> dict[str, Any]:
    import torch

    return {"cpu": _cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg": [round(x, 2) for x in os.getloadavg()], "other_pytest": _other_pytests()}


# --------------------------------------------------------------------------- main

def _pct(vals: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(vals, dtype=float), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="series per kind (after one warm-up series)")
    ap.add_argument("--n-chestct", type=int, default=None, help="series for chest CT (default: --n)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: cxr, bct, chestct")
    ap.add_argument("--presets", choices=sorted(PRESETS), default="cpu",
                    help="cpu: cpu-cxr, cpu-bct, cpu-chestct; paper: paper-cxr, paper-bct, ct3dflow (GPU)")
    ap.add_argument("--cxr-size", type=int, default=1024, help="radiograph rows = columns")
    ap.add_argument("--headct-shape", type=_shape, default=(24, 512, 512), help="head CT D x H x W")
    ap.add_argument("--chestct-shape", type=_shape, default=(120, 160, 160),
                    help=f"chest CT D x H x W ({CHEST_SPACING_MM:g} mm isotropic)")
    ap.add_argument("--poll", type=float, default=None,
                    help="executor and dispatch poll seconds (default: the node's, 0.5 and 1)")
    ap.add_argument("--jitter", type=float, default=1.0,
                    help="the pause between series is 0.2 s + uniform(0, this) s (seeded)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one series's results")
    ap.add_argument("--workdir", type=Path, default=None, help="node and PACS folders (default: under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the node's data and the PACS's files")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        sys.exit(f"unknown kind(s) {bad}; use {', '.join(KINDS)}")
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} (dcmtk) is not on PATH")
    import torch

    device = None
    if args.presets == "paper":
        if not torch.cuda.is_available():
            sys.exit("--presets paper needs a CUDA GPU (the paper presets are far too large for a CPU)")
        device = "cuda"
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ["TCP_NODELAY"] = "1"  # the SCP process inherits it
    counts = {k: (args.n_chestct if k == "chestct" and args.n_chestct else args.n) for k in kinds}

    bundles = {k: cached_bundle(k, PRESETS[args.presets][k], device) for k in kinds}
    studies = {k: cached_studies(k, counts[k] + 1, args) for k in kinds}
    for k in kinds:  # warm the page cache: every send reads from memory
        for st in studies[k]:
            for f in st.folder.glob("*.dcm"):
                f.read_bytes()

    machine = _machine()
    work = Path(tempfile.mkdtemp(prefix="bench-latency-", dir=args.workdir))
    poll: dict[str, Any] = {} if args.poll is None else {"poll_seconds": args.poll}
    pacs = Pacs(work).start()
    settings = load_settings(
        node={"data_dir": str(work / "node")}, receive={"host": "127.0.0.1", "port": 0},
        models={k: str(bundles[k]) for k in kinds}, executor=poll,
        dispatch={"destinations": [{"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1",
                                    "port": pacs.port}], **poll})
    presets = {k: PRESETS[args.presets][k] for k in kinds}
    print(f"\nlatency: storescu's exit (last instance acknowledged, association released) -> the SR and "
          f"every SEG accepted by storescp; series one after another\n"
          f"machine: {machine['cpu']}, {machine['cpus']} CPUs, torch {torch.__version__} with "
          f"{machine['torch_threads']} threads, load average {machine['load_avg']}"
          + (f", GPU {machine['cuda']}" if machine["cuda"] else ", no GPU") + "\n"
          f"other pytest processes at the start: {machine['other_pytest'] or 'none'}\n"
          f"node: local executor ({settings.executor.threads} thread, "
          f"poll {settings.executor.poll_seconds:g} s), "
          f"dispatch poll {settings.dispatch.poll_seconds:g} s, fsync {settings.storage.fsync}, "
          f"early finish {settings.assemble.early_finish}, SQLite\n"
          f"bundles ({args.presets} presets): "
          + ", ".join(f"{k} {presets[k]}" for k in kinds)
          + f" - trained {EPOCHS} epoch (+ {FINETUNE_EPOCHS} fine-tuning) on a few dozen phantoms: the "
          "inference cost depends only on the preset's architecture and the input size, not on "
          "training length\n")
    print("| kind | series | instances | abnormal | send s | latency s | complete | queued | analysis "
          "(read, score) | reports | delivery | objects |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    runs: list[Run] = []
    rng = random.Random(20240601)
    node = Node(settings, log_level=logging.WARNING).start()
    ok = False
    try:
        for k in kinds:
            for j, st in enumerate(studies[k]):
                r = measure(node, pacs, st, work, args.timeout, cold=j == 0)
                runs.append(r)
                s = r.stages
                stage = (f"{s['complete']:.2f} | {s['queued']:.2f} | {s['analysis']:.2f} ({s['read']:.2f}, "
                         f"{s['score']:.2f}) | {s['reports']:.2f} | {s['delivery']:.2f}"
                         if s else " | | | | ")
                objs = ", ".join(f"{v} {m}" for m, v in r.objects.items())
                print(f"| {k} | {st.index}{' (cold)' if r.cold else ''} | {r.instances} | "
                      f"{'yes' if r.abnormal else 'no'} | {r.send_s:.2f} | {r.latency_s:.2f} | {stage} | "
                      f"{objs} |", flush=True)
                time.sleep(0.2 + rng.uniform(0.0, args.jitter))
        ok = True
    finally:
        node.stop()
        pacs.stop()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"left {work} for a look", file=sys.stderr)

    after = _other_pytests()
    summary: dict[str, Any] = {"bench": "latency", "presets": args.presets, "n": counts,
                               "cxr_size": args.cxr_size, "headct_shape": list(args.headct_shape),
                               "chestct_shape": list(args.chestct_shape),
                               "chestct_spacing_mm": CHEST_SPACING_MM,
                               "jitter_s": args.jitter, "executor_poll_s": settings.executor.poll_seconds,
                               "dispatch_poll_s": settings.dispatch.poll_seconds,
                               "training_epochs": EPOCHS, "machine": machine, "other_pytest_at_end": after,
                               "kinds": {}}
    print(f"\nother pytest processes at the end: {after or 'none'}\n")
    print("| kind | preset | n | median s | p95 s | max s | cold s | goal s | median, p95 vs goal "
          "| median stages: complete, queued, analysis (read, score), reports, delivery |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in kinds:
        warm = [r for r in runs if r.kind == k and not r.cold]
        cold = [r for r in runs if r.kind == k and r.cold]
        lat = [r.latency_s for r in warm]
        med, p95, mx = statistics_of(lat)
        goal = GOALS_S[k] if args.presets == "cpu" else None
        meets = None if goal is None else {"median": med <= goal, "p95": p95 <= goal}
        st_med = {name: round(float(np.median([r.stages[name] for r in warm if r.stages])), 3)
                  for name in ("complete", "queued", "analysis", "read", "score", "reports", "delivery")
                  if any(r.stages for r in warm)}
        verdict = ("" if meets is None else
                   f"{'meets' if meets['median'] else 'above'}, {'meets' if meets['p95'] else 'above'}")
        stages = (f"{st_med['complete']:.2f}, {st_med['queued']:.2f}, {st_med['analysis']:.2f} "
                  f"({st_med['read']:.2f}, {st_med['score']:.2f}), {st_med['reports']:.2f}, "
                  f"{st_med['delivery']:.2f}" if st_med else "")
        print(f"| {LABELS[k]} | {presets[k]} | {len(warm)} | {med:.2f} | {p95:.2f} | {mx:.2f} | "
              f"{cold[0].latency_s:.2f} | {'' if goal is None else f'{goal:g}'} | {verdict} | {stages} |")
        summary["kinds"][k] = {
            "preset": presets[k], "n": len(warm), "median_s": round(med, 3), "p95_s": round(p95, 3),
            "max_s": round(mx, 3), "min_s": round(min(lat), 3), "cold_s": round(cold[0].latency_s, 3),
            "goal_s": goal, "meets": meets, "stages_median_s": st_med,
            "instances": warm[0].instances, "objects": warm[0].objects, "method": warm[0].node.get("method")}
    summary["runs"] = [{"kind": r.kind, "index": r.index, "cold": r.cold, "abnormal": r.abnormal,
                        "latency_s": round(r.latency_s, 4), "send_s": round(r.send_s, 4),
                        "stages_s": {a: round(b, 4) for a, b in r.stages.items()}, "objects": r.objects,
                        "priority": r.node.get("priority")} for r in runs]
    print()
    print(json.dumps(summary))


def statistics_of(vals: list[float]) -> tuple[float, float, float]:
    return float(np.median(vals)), _pct(vals, 95), float(max(vals))


if __name__ == "__main__":
    main()
