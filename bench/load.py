"""Load and leaks: 10 000 instances from 4 concurrent senders into a node that analyses them.

    .venv/bin/python bench/load.py [--series 250] [--slices 40] [--senders 4] [--workdir DIR]

The node runs as ``triage serve`` runs it (:class:`triage.serve.Node`: the SCP in its own
process; assembler, local executor and delivery loop in this one) on embedded defaults
(SQLite, durability on) with the demo head-CT bundle (``models/bct``). The data are head-CT
phantoms written as DICOM (``--series`` studies of ``--slices`` 64×64 slices, cached under
``/tmp/triage-bench-load``); ``--senders`` threads each send their share of the series with
dcmtk's ``storescu`` (one association per series, ``TCP_NODELAY=1``), as PACS routing does.

Every 2 s a sampler records, for the SCP process and for this process (the executor and the
assembler), the resident memory (VmRSS) and the number of open file descriptors, and the
instances indexed so far. Reported: the sustained receive rate (instances / seconds from
the first association to the last acknowledgement), memory growth after warm-up (the first
20 % of the instances) to the end, file descriptors at warm-up and at the end (after the
queue drained), and the latency of each series from its last acknowledgement (release) to
its job finished, p50/p95/max, under the load. Goals (issue 8): memory growth < 50 MB after
warm-up, no descriptor leak. A table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))

from netkit import free_port, run_storescu  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from storage.models import Instance, Job, Series  # noqa: E402
from triage.config import load_settings  # noqa: E402
from triage.serve import Node  # noqa: E402

CACHE = Path("/tmp/triage-bench-load")


def _proc(pid: int) -> tuple[float, int]:
    """(VmRSS in MB, open descriptors) of a process, from /proc."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def make_data(n: int, slices: int) -> list[Path]:
    from flows.phantoms import make_headct
    from triage.phantom_dicom import write_dicom_studies

    root = CACHE / f"{n}x{slices}"
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        for start in range(0, n, 50):  # in chunks: the generator holds its volumes in memory
            m = min(50, n - start)
            ps = make_headct(m, shape=(slices, 64, 64), abnormal_fraction=0.5, seed=1000 + start)
            write_dicom_studies(ps, root / f"chunk{start:05d}", seed=1000 + start)
        (root / "done").write_text("ok")
    return sorted(p for p in root.glob("chunk*/*") if p.is_dir())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=250)
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/triage-bench-load-run"))
    args = ap.parse_args()
    t = time.perf_counter()
    folders = make_data(args.series, args.slices)
    total = sum(len(list(f.glob("*.dcm"))) for f in folders)
    print(f"data: {len(folders)} series, {total} instances ({time.perf_counter() - t:.0f} s to prepare)")
    shutil.rmtree(args.workdir, ignore_errors=True)
    port = free_port()
    settings = load_settings(node={"data_dir": str(args.workdir / "data")}, receive={"port": port},
                             models={"bct": str(ROOT / "models" / "bct")}, web={"enabled": False})
    node = Node(settings, log_level=logging.WARNING).start()
    assert node._scp is not None and node._scp.pid is not None
    pids = {"scp": node._scp.pid, "node": os.getpid()}
    samples: list[dict[str, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(2.0):
            with node.db.sessions() as s:
                n = s.scalar(select(func.count()).select_from(Instance)) or 0
                done = s.scalar(select(func.count()).select_from(Job)
                                .where(Job.state.in_(("done", "failed")))) or 0
            row: dict[str, float] = {"t": time.perf_counter(), "instances": n, "done": done}
            for name, pid in pids.items():
                row[f"{name}_rss"], row[f"{name}_fds"] = _proc(pid)
            samples.append(row)

    threading.Thread(target=sample, daemon=True).start()
    shares = [folders[i::args.senders] for i in range(args.senders)]
    ends: list[float] = []
    logs = args.workdir / "storescu.log"
    t0 = time.perf_counter()

    def send(share: list[Path]) -> None:
        for f in share:
            run_storescu(["-aec", "TRIAGE", "+sd", "+r", "127.0.0.1", str(port), str(f)], logs)
        ends.append(time.perf_counter())

    threads = [threading.Thread(target=send, args=(sh,)) for sh in shares]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t_sent = max(ends)
    # drain: every series analysed (or failed with its reason)
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        with node.db.sessions() as s:
            open_jobs = s.scalar(select(func.count()).select_from(Job)
                                 .where(Job.state.in_(("queued", "running")))) or 0
            series = s.scalar(select(func.count()).select_from(Series)) or 0
            receiving = s.scalar(select(func.count()).select_from(Series)
                                 .where(Series.state == "receiving")) or 0
        if series >= len(folders) and not open_jobs and not receiving:
            break
        time.sleep(1.0)
    time.sleep(4.0)  # one more sample after the queue drained
    stop.set()
    with node.db.sessions() as s:
        indexed = s.scalar(select(func.count()).select_from(Instance)) or 0
        lat = [(j.finished_at - se.released_at).total_seconds()
               for se, j in s.execute(select(Series, Job).join(Job, Job.series_id == Series.id)
                                      .where(Job.state.in_(("done", "failed"))))
               if se.released_at is not None and j.finished_at is not None]
        states = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    node.stop()
    # warm: 20 % of the instances in and 20 % of the series analysed (models loaded, highdicom
    # imported, caches filled), so what grows after it is what grows with the load
    warm = next(x for x in samples if x["instances"] >= 0.2 * total and x["done"] >= 0.2 * len(folders))
    last = samples[-1]
    out = {
        "instances": total, "indexed": indexed, "series": len(folders), "senders": args.senders,
        "receive_seconds": round(t_sent - t0, 1), "rate_per_s": round(total / (t_sent - t0), 1),
        "jobs": states,
        "scp_rss_warm_mb": round(warm["scp_rss"], 1), "scp_rss_end_mb": round(last["scp_rss"], 1),
        "scp_growth_mb": round(last["scp_rss"] - warm["scp_rss"], 1),
        "node_rss_warm_mb": round(warm["node_rss"], 1), "node_rss_end_mb": round(last["node_rss"], 1),
        "node_growth_mb": round(last["node_rss"] - warm["node_rss"], 1),
        "scp_fds_warm": int(warm["scp_fds"]), "scp_fds_end": int(last["scp_fds"]),
        "node_fds_warm": int(warm["node_fds"]), "node_fds_end": int(last["node_fds"]),
        "latency_p50_s": round(float(np.percentile(lat, 50)), 2) if lat else None,
        "latency_p95_s": round(float(np.percentile(lat, 95)), 2) if lat else None,
        "latency_max_s": round(max(lat), 2) if lat else None,
        "peak_scp_rss_mb": round(max(x["scp_rss"] for x in samples), 1),
        "peak_node_rss_mb": round(max(x["node_rss"] for x in samples), 1),
    }
    print("| measure | value |\n|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v} |")
    print(json.dumps({"bench": "load", "goal_growth_mb": 50, **out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
