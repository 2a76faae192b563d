"""``triage demo``: the whole product on one machine, in a few minutes, with nothing to set up.

Synthetic chest radiographs, head CTs and chest CTs (half of them with a finding) are written
as DICOM studies; a node starts on embedded defaults (SQLite, the local executor) with the
demo bundles in ``models/``; a local PACS stand-in starts (Debian's Orthanc when installed,
else an in-process storage SCP); the studies reach the node over DICOM (Orthanc routes them
as a PACS would; the stand-in SCP's studies are pushed with a storage SCU); the demo waits
for every result and its SR/SEG deliveries, prints the ranked worklist beside the truth,
says where the results landed, and writes an HTML report with the overlays. The demo
bundles are trained on synthetic phantoms and are not for clinical use.
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import logging
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

from storage.models import Delivery, Result, Series, Study
from triage.config import KINDS, Settings, load_settings
from triage.rank import worklist
from triage.standin import Orthanc, StoreSCP, free_port

__all__ = ["DemoOptions", "DemoOutcome", "run_demo"]

log = logging.getLogger(__name__)
DEFAULT_MODELS = Path(__file__).resolve().parents[1] / "models"
DEFAULT_COUNTS = {"cxr": 16, "bct": 6, "chestct": 6}
PRIORITY_STYLE = {1: "bold white on red", 2: "bold white on dark_orange3", 3: "black on yellow",
                  4: "white on green4"}


@dataclass
class DemoOptions:
    out: Path = Path("runs/demo")
    # enough studies that the reading order reflects the models: with 8 radiographs one normal
    # at the 90th percentile decided the concordance (docs/results.md, session 8)
    counts: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_COUNTS))
    models: Path = DEFAULT_MODELS
    pacs: str = "auto"  # "auto" (Orthanc when installed), "orthanc" or "scp"
    web_port: int = 8080
    seed: int = 2026  # the demo's phantoms differ from the bundles' training data (seeds 1-4)
    timeout: float = 240.0
    keep_running: bool = False


@dataclass
class Case:
    kind: str
    files: list[Path]
    study_uid: str
    series_uid: str
    label: int
    finding: str


@dataclass
class DemoOutcome:
    settings: Settings
    cases: list[Case]
    rows: list[dict[str, Any]]
    concordance: dict[str, float]  # per kind and "all": P(an abnormal study ranks above a normal one)
    outputs: dict[str, int]  # modality -> instances the PACS received from the node
    report: Path
    pacs: str
    seconds: float


def _bundles(models: Path) -> dict[str, Path]:
    found = {k: models / k for k in KINDS if (models / k / "manifest.json").is_file()}
    if not found:
        raise FileNotFoundError(f"no demo bundles in {models} (expected {models}/cxr/manifest.json ...); "
                                "train them with scripts/train-demo-models")
    return found


MARKER = ".triage-demo"
OWNED = ("studies", "node", "orthanc", "pacs", "report", "report.html")


def fresh_workdir(out: Path) -> None:
    """Empty what an earlier demo left in ``out``, so every run analyses its studies anew.

    The studies are deterministic, so a node database left from an earlier run would take
    them as duplicates and show that run's results (from whatever models it had). Only a
    folder marked as a demo's is cleared, and only the demo's own entries in it.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; give --out a new or empty folder")
    # a folder from before the marker: the demo's own database and phantom label files
    earlier = (out / MARKER).is_file() or (
        (out / "node" / "triage.db").is_file() and any((out / "studies").glob("*/labels.csv")))
    if out.exists() and not earlier and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and not a triage demo folder; give --out an "
                              "empty or new folder (the demo replaces what it writes there)")
    out.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    (out / MARKER).unlink(missing_ok=True)  # never write through a link someone left there
    (out / MARKER).write_text("a triage demo's working folder; `triage demo` replaces its contents\n",
                              encoding="utf-8")


def make_studies(out: Path, counts: dict[str, int], seed: int) -> list[Case]:
    """Phantom studies as DICOM, half of each kind with a finding (exactly: ``n // 2``), with
    the truth from labels.csv, in a shuffled order (arrival order breaks ties in the
    worklist, so it must not follow the truth)."""
    from flows.phantoms import make_cxr, make_headct
    from flows.phantoms.chestct import make_chestct
    from triage.phantom_dicom import write_dicom_studies

    cases: list[Case] = []
    for i, (kind, n) in enumerate(sorted(counts.items())):
        for part, (m, fraction) in enumerate(((n - n // 2, 0.0), (n // 2, 1.0))):
            if m <= 0:
                continue
            s = seed + 17 * i + part
            if kind == "cxr":
                ps: Any = make_cxr(m, size=64, abnormal_fraction=fraction, seed=s)
            elif kind == "bct":
                ps = make_headct(m, shape=(16, 64, 64), abnormal_fraction=fraction, seed=s)
            else:
                # 3 mm slices (routed as chest CT: <= 3 mm), the field of view of the 4 mm training set
                ps = make_chestct(m, shape=(86, 96, 128), spacing_mm=3.0, abnormal_fraction=fraction, seed=s)
            folder = out / f"{kind}-{'abnormal' if fraction else 'normal'}"
            labels = write_dicom_studies(ps, folder, seed=s)
            with labels.open(newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    cases.append(Case(kind=kind, files=sorted((folder / row["case"]).glob("*.dcm")),
                                      study_uid=row["study_instance_uid"],
                                      series_uid=row["series_instance_uid"], label=int(row["label"]),
                                      finding=row["finding"] or "normal"))
    order = np.random.default_rng(seed).permutation(len(cases))
    return [cases[int(k)] for k in order]


def _progress(db: Any, series_uids: list[str]) -> tuple[int, int, int]:
    """(series received, results, results whose deliveries are all settled) among ours."""
    with db.sessions() as s:
        received = s.scalar(select(func.count()).select_from(Series)
                            .where(Series.series_instance_uid.in_(series_uids))) or 0
        res = s.execute(select(Result.id, Result.report_state).join(Series, Series.id == Result.series_id)
                        .where(Series.series_instance_uid.in_(series_uids))).all()
        unsettled = set(s.scalars(select(Delivery.result_id).where(
            Delivery.result_id.in_([r for r, _ in res]), Delivery.state.in_(("pending", "sending")))))
    settled = sum(1 for rid, state in res if state in ("ready", "failed") and rid not in unsettled)
    return received, len(res), settled


def concordance(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per kind and over all: the fraction of (abnormal, normal) pairs in which the abnormal
    study is read first (the AUROC of the reading order). Two studies with the same priority
    and percentile are read in arrival order, which says nothing about the models: such a
    pair counts one half, as a tie does in an AUROC."""
    out: dict[str, float] = {}
    for kind in [*sorted({r["kind"] for r in rows}), "all"]:
        sub = [r for r in rows if kind == "all" or r["kind"] == kind]
        pos = [r for r in sub if r["label"] == 1]
        neg = [r for r in sub if r["label"] == 0]
        if pos and neg:
            def won(a: dict[str, Any], b: dict[str, Any]) -> float:
                if (a["priority"], a["percentile"]) == (b["priority"], b["percentile"]):
                    return 0.5
                return float(a["rank"] < b["rank"])
            out[kind] = sum(won(p, n) for p in pos for n in neg) / (len(pos) * len(neg))
    return out


def _write_report(out: Path, outcome_rows: list[dict[str, Any]], conc: dict[str, float], db: Any,
                  settings: Settings, where: str) -> Path:
    from triage.bundles import find_bundle
    from triage.web.charts import overlay_png, reference_png

    img = out / "report"
    img.mkdir(parents=True, exist_ok=True)
    from storage.blobs import BlobStore

    blobs = BlobStore(settings.blob_root)
    body = []
    for r in outcome_rows:
        pics = []
        if r.get("result_id") is not None:
            try:
                (img / f"overlay-{r['rank']:03d}.png").write_bytes(overlay_png(db, blobs, r["result_id"]))
                pics.append(f'<img src="report/overlay-{r["rank"]:03d}.png" width="200" alt="overlay">')
            except LookupError:
                pass
            b = find_bundle(settings, r["bundle"], r["bundle_version"])
            if b is not None and b.calibration.get("reference") and r["score"] is not None:
                (img / f"reference-{r['rank']:03d}.png").write_bytes(reference_png(
                    b.calibration["reference"], r["score"], b.calibration.get("threshold"), r["percentile"]))
                pics.append(f'<img src="report/reference-{r["rank"]:03d}.png" width="340" alt="reference">')
        pct = "" if r["percentile"] is None else f"{r['percentile']:.1f}"
        body.append(
            f"<tr class=\"{'abn' if r['label'] else 'nor'}\"><td>{r['rank']}</td>"
            f"<td><span class=\"p{r['priority'] or 0}\">{html.escape(r['priority_name'])}</span></td>"
            f"<td>{pct}</td><td>{html.escape(r['kind'])}</td>"
            f"<td>{'<b>' + html.escape(r['finding']) + '</b>' if r['label'] else 'normal'}</td>"
            f"<td>{html.escape(r['accession'] or '')}</td>"
            f"<td><div class=\"pics\">{''.join(pics)}</div></td></tr>")
    summary = ", ".join(f"{k} {100 * v:.0f}%" for k, v in conc.items())
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>triage demo report</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5rem;color:#1d2125}}table{{border-collapse:collapse}}
td,th{{padding:.3rem .6rem;border-bottom:1px solid #ddd;vertical-align:middle;text-align:left}}
tr.abn td:nth-child(5){{color:#b3001b}}
span{{padding:.1rem .4rem;border-radius:.5rem;color:#fff;font-size:.85rem}}
.p1{{background:#b3001b}}.p2{{background:#e0601a}}.p3{{background:#c9a100}}.p4{{background:#3b8a3e}}
.p0{{background:#888}} .warn{{background:#fff3cd;padding:.6rem;border-radius:.3rem}}
.pics{{display:flex;gap:.5rem;align-items:center}}</style></head><body>
<h1>triage demo: the worklist in reading order</h1>
<p class="warn"><b>Demo models trained on synthetic phantoms: not for clinical use.</b></p>
<p>Generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. An abnormal study is read before a normal one in
<b>{summary}</b> of the (abnormal, normal) pairs (50% = chance). {html.escape(where)}</p>
<table><thead><tr><th>#</th><th>priority</th><th>percentile</th><th>kind</th><th>truth</th><th>accession</th>
<th>map overlay · score on the bundle's reference distribution</th></tr></thead><tbody>
{''.join(body)}</tbody></table></body></html>"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def run_demo(opts: DemoOptions, console: Console | None = None) -> DemoOutcome:
    from triage.serve import Node, stop_on_signals

    console = console or Console()
    t0 = time.monotonic()
    out = opts.out.resolve()
    bundles = _bundles(opts.models.resolve())
    fresh_workdir(out)
    use_orthanc = opts.pacs == "orthanc" or (opts.pacs == "auto" and _has_orthanc())
    console.print("[bold]triage demo[/] — demo models trained on synthetic phantoms, [bold red]not for "
                  "clinical use[/]")
    with console.status("writing synthetic studies (DICOM)"):
        counts = {k: n for k, n in opts.counts.items() if k in bundles}
        cases = make_studies(out / "studies", counts, opts.seed)
    console.print(f"  {len(cases)} studies written to {out / 'studies'} "
                  f"({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}; half with a finding)")
    node_port = free_port()
    pacs: Orthanc | StoreSCP
    if use_orthanc:
        pacs = Orthanc(out / "orthanc", node_port=node_port)
        dest = {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
    else:
        pacs = StoreSCP(out / "pacs")
        dest = {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}
    data = out / "node"
    settings = load_settings(
        node={"data_dir": str(data), "name": "triage-demo"},
        receive={"port": node_port, "host": "127.0.0.1"},
        assemble={"quiet_seconds": 3.0},
        models={k: str(p) for k, p in bundles.items()},
        dispatch={"destinations": [dest], "poll_seconds": 0.5, "backoff_initial_seconds": 1.0},
        web={"host": "127.0.0.1", "port": opts.web_port},
    )
    pacs.start()  # first: the node checks its destination at start-up
    try:
        node = Node(settings, log_level=logging.WARNING).start()
    except BaseException:
        pacs.stop()
        raise
    url = f"http://127.0.0.1:{node.web.port}" if node.web is not None else ""
    console.print(f"  node up: AE TRIAGE on port {node.port}, status page {url}; PACS stand-in: "
                  + (f"Orthanc (web http://127.0.0.1:{pacs.http_port}/app/explorer.html)"
                     if isinstance(pacs, Orthanc) else f"storage SCP {pacs.aet} on port {pacs.port}"))
    try:
        series = [c.series_uid for c in cases]
        with Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=False) as bar:
            t_send = bar.add_task("studies sent to the node", total=len(cases))
            t_recv = bar.add_task("series received", total=len(cases))
            t_res = bar.add_task("analysed", total=len(cases))
            t_del = bar.add_task("SR/SEG delivered", total=len(cases))
            for c in cases:
                if isinstance(pacs, Orthanc):  # into the PACS; its routing rule sends each series on
                    for f in c.files:
                        pacs.upload(f)
                else:
                    StoreSCP.push(c.files, node_port, calling_ae=pacs.aet)
                bar.advance(t_send)
            deadline = time.monotonic() + opts.timeout
            while True:
                received, analysed, settled = _progress(node.db, series)
                bar.update(t_recv, completed=received)
                bar.update(t_res, completed=analysed)
                bar.update(t_del, completed=settled)
                if settled >= len(cases):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"after {opts.timeout:.0f} s only {analysed} of {len(cases)} series "
                                       f"were analysed and {settled} delivered; see {data} and the "
                                       f"status page {url}")
                time.sleep(0.5)
        rows = _ranked(node.db, cases)
        conc = concordance(rows)
        outputs = dict(pacs.modality_counts())
        where = (f"Orthanc received {outputs.get('SR', 0)} SR and {outputs.get('SEG', 0)} SEG objects from "
                 f"the node (http://127.0.0.1:{pacs.http_port}/app/explorer.html while it runs)."
                 if isinstance(pacs, Orthanc) else
                 f"The storage SCP received {outputs.get('SR', 0)} SR and {outputs.get('SEG', 0)} SEG "
                 f"objects, kept in {out / 'pacs'}.")
        report = _write_report(out, rows, conc, node.db, settings, where)
        _print_worklist(console, rows, conc)
        console.print(f"  {where}")
        console.print(f"  HTML report with overlays: [link=file://{report}]{report}[/link]")
        secs = time.monotonic() - t0
        console.print(f"  done in {secs:.0f} s")
        outcome = DemoOutcome(settings=settings, cases=cases, rows=rows, concordance=conc, outputs=outputs,
                              report=report, pacs="orthanc" if isinstance(pacs, Orthanc) else "scp",
                              seconds=secs)
        if opts.keep_running:
            password = _demo_user(node.db)
            console.print(f"  status page {url}/dashboard — user [bold]demo[/], password [bold]{password}[/] "
                          "(admin); Ctrl-C stops the node")
            stop_on_signals().wait()
        return outcome
    finally:
        node.stop()
        pacs.stop()


def _has_orthanc() -> bool:
    return shutil.which("Orthanc") is not None


def _demo_user(db: Any) -> str:
    from storage.models import User
    from triage.web.security import create_user, hash_password

    password = secrets.token_urlsafe(9)
    with db.session() as s:
        user = s.scalar(select(User).where(User.username == "demo"))
        if user is None:
            create_user(s, "demo", password, "admin", actor="demo")
        else:
            user.password_hash = hash_password(password)
    return password


def _ranked(db: Any, cases: list[Case]) -> list[dict[str, Any]]:
    truth = {c.study_uid: c for c in cases}
    with db.sessions() as s:
        order = [r for r in worklist(s, limit=10_000) if r.study_instance_uid in truth]
        latest = {}
        for st_uid, res in s.execute(
                select(Study.study_instance_uid, Result).join(Series, Series.study_id == Study.id)
                .join(Result, Result.series_id == Series.id).order_by(Result.version)):
            latest[st_uid] = res
        rows = []
        for i, r in enumerate(order, 1):
            c, res = truth[r.study_instance_uid], latest.get(r.study_instance_uid)
            rows.append({"rank": i, "priority": r.priority, "priority_name": r.priority_name,
                         "percentile": r.percentile, "kind": c.kind, "label": c.label, "finding": c.finding,
                         "accession": r.accession_number, "state": r.state,
                         "result_id": None if res is None else res.id,
                         "score": None if res is None else res.score,
                         "bundle": None if res is None else res.bundle_name,
                         "bundle_version": None if res is None else res.bundle_version})
    return rows


def _print_worklist(console: Console, rows: list[dict[str, Any]], conc: dict[str, float]) -> None:
    t = Table(title="worklist in reading order (truth shown for the demo only)")
    for col in ("#", "priority", "percentile", "kind", "truth", "accession", "state"):
        t.add_column(col, justify="right" if col in ("#", "percentile") else "left")
    for r in rows:
        p = r["priority"]
        truth = f"[bold red]{r['finding']}[/]" if r["label"] else "normal"
        t.add_row(str(r["rank"]), f"[{PRIORITY_STYLE.get(p, 'white on grey50')}] {r['priority_name']} [/]",
                  "" if r["percentile"] is None else f"{r['percentile']:.1f}", r["kind"], truth,
                  r["accession"] or "", r["state"])
    console.print(t)
    pairs = ", ".join(f"{k} [bold]{100 * v:.0f}%[/]" for k, v in conc.items())
    console.print(f"  abnormal read before normal: {pairs} of (abnormal, normal) pairs (50% = chance)")

