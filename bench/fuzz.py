"""Fuzzing the path from received bytes to the arrays the models see (issue 8C), as a benchmark.

    nice -n 10 .venv/bin/python bench/fuzz.py --minutes 30 [--seed 1] [--out DIR] [--engine atheris|random]

The target is ``tests/fuzzing.py``'s :class:`Target` (the SCP's C-STORE handler and
``Ingest``, the early finish and the quiet period with routing, ``run_job`` up to the
model, on a fresh node state per input); findings are exceptions other than the node's
clean refusals, exceptions the node catches and logs, 0xA700 on an empty node, non-finite
or out-of-range model inputs and inputs slower than ``--slow-seconds``.

Engines:

* ``atheris`` (the default when ``pip install atheris`` worked; the ``fuzz`` extra): libFuzzer,
  coverage-guided over the Python code of ``pydicom``, ``triage``, ``flows``, ``worker`` and
  ``storage`` (instrumented at import), with the structure-aware mutator of
  ``tests/fuzzing.py`` whose byte-level mutations are libFuzzer's own (``atheris.Mutate``).
  The corpus libFuzzer grows is kept under ``OUT/corpus``;
* ``random``: the same mutator with Python's ``random``; an input whose outcome
  (statuses, routing, job) was not seen before joins the corpus.

Seeds: valid radiograph / head-CT / chest-CT studies of the product's phantom writer and of
``tests/dicomgen.py``, and every case of the bad-input corpus (``tests/badinput.py``).

Each finding is saved under ``OUT/findings``: ``<kind>-<digest>.fuzz`` (replay it with
``Target()(Path(p).read_bytes())`` from ``tests/fuzzing.py``) and a folder of its ``.dcm``
files; at most 3 reproducers per distinct finding (kind, exception type, place).
``OUT/summary.json`` is rewritten every minute and at the end (also printed as one line):
iterations, inputs/s, distinct outcomes, statuses, routes, jobs, findings.

One process, one core (the machine is shared): run it under ``nice``. The address space is
limited (``--memory-gb`` above what the imports use), so a memory blow-up is a
``MemoryError`` finding instead of the machine's OOM killer; an input still running after
``--hang-seconds`` is saved as a ``hang`` finding and the run stops there.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import random
import resource
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

INSTRUMENTED = ["pydicom", "triage", "flows", "worker", "storage", "fuzzing", "badinput", "dicomgen"]


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


class Run:
    """Counts, findings and the summary of one fuzzing run."""

    def __init__(self, args: argparse.Namespace, out: Path, engine: str) -> None:
        import fuzzing

        self.fz = fuzzing
        self.args = args
        self.out = out
        self.engine = engine
        self.findings_dir = out / "findings"
        self.target = fuzzing.Target(slow_seconds=args.slow_seconds)
        self.t0 = time.monotonic()
        self.started = dt.datetime.now(dt.UTC)
        self.deadline = self.t0 + 60 * args.minutes
        self.iterations = 0
        self.model_inputs = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[str] = collections.Counter()
        self.comments: collections.Counter[str] = collections.Counter()
        self.routes: collections.Counter[str] = collections.Counter()
        self.jobs: collections.Counter[str] = collections.Counter()
        self.findings: dict[str, dict[str, Any]] = {}
        self.slowest = 0.0
        self.current: bytes | None = None
        self.current_since = 0.0
        self.next_summary = self.t0 + 60
        self.seeds = 0
        self.corpus_dir = out / "corpus"

    def one(self, data: bytes) -> Any:
        """Run one input; a finding is recorded, never raised (the run goes on)."""
        self.current, self.current_since = data, time.monotonic()
        self.iterations += 1
        try:
            o = self.target(data)
        except self.fz.Finding as f:
            self._finding(f, data)
            o = None
        finally:
            self.current = None
        if o is not None:
            self.slowest = max(self.slowest, o.seconds)
            self.model_inputs += o.reached_model
            sig = o.signature()
            if len(self.outcomes) < 20000 or sig in self.outcomes:
                self.outcomes[sig] += 1
            self.statuses.update(o.statuses)
            self.comments.update(self.fz._norm(c, 60) for c in o.comments)
            self.routes.update(r.split(" ", 1)[0] for r in o.routes)
            self.jobs.update(j.split(":", 1)[0].split(" ", 1)[0] for j in o.jobs)
        now = time.monotonic()
        if now >= self.next_summary:
            self.write_summary(final=False)
            self.next_summary = now + 60
        if now >= self.deadline:
            self.write_summary(final=True)
            self.target.close()
            sys.stdout.flush()
            os._exit(0)
        return o

    def _finding(self, f: Any, data: bytes) -> None:
        rec = self.findings.setdefault(f.signature, {
            "kind": f.kind, "message": f.message[:400], "where": f.where, "count": 0,
            "first_iteration": self.iterations, "first_seconds": round(time.monotonic() - self.t0, 1),
            "reproducers": []})
        rec["count"] += 1
        if len(rec["reproducers"]) < 3:
            name = f"{f.kind}-{self.fz.digest(data)}"
            rec["reproducers"].append(str(self.fz.save_reproducer(data, self.findings_dir, name)))
            print(f"[{time.monotonic() - self.t0:7.0f} s] finding #{len(self.findings)} ({rec['count']}): "
                  f"{f}"[:600], flush=True)

    def hang(self, data: bytes, seconds: float) -> None:
        name = f"hang-{self.fz.digest(data)}"
        path = self.fz.save_reproducer(data, self.findings_dir, name)
        self.findings["hang"] = {"kind": "hang", "message": f"still running after {seconds:.0f} s",
                                 "where": "", "count": 1, "first_iteration": self.iterations,
                                 "first_seconds": round(time.monotonic() - self.t0, 1),
                                 "reproducers": [str(path)]}
        self.write_summary(final=True, stopped="hang")

    def summary(self, *, final: bool, stopped: str | None = None) -> dict[str, Any]:
        secs = time.monotonic() - self.t0
        corpus = sum(1 for _ in self.corpus_dir.iterdir()) if self.corpus_dir.is_dir() else None
        return {
            "bench": "fuzz", "engine": self.engine, "final": final, "stopped": stopped,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "seed": self.args.seed, "minutes": self.args.minutes,
            "started": self.started.isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "processor": platform.processor() or None},
            "iterations": self.iterations, "seconds": round(secs, 1),
            "inputs_per_s": round(self.iterations / secs, 2) if secs else None,
            "seeds": self.seeds, "corpus_files": corpus,
            "reached_model": self.model_inputs, "slowest_clean_input_s": round(self.slowest, 3),
            "distinct_outcomes": len(self.outcomes),
            "statuses": dict(self.statuses.most_common()),
            "refusal_comments": dict(self.comments.most_common(40)),
            "routes": dict(self.routes.most_common()),
            "jobs": dict(self.jobs.most_common()),
            "top_outcomes": [{"count": c, "outcome": s} for s, c in self.outcomes.most_common(40)],
            "findings_dir": str(self.findings_dir),
            "distinct_findings": len(self.findings),
            "findings": list(self.findings.values()),
        }

    def write_summary(self, *, final: bool, stopped: str | None = None) -> None:
        s = self.summary(final=final, stopped=stopped)
        (self.out / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
        if final:
            brief = {k: s[k] for k in ("bench", "engine", "iterations", "seconds", "inputs_per_s",
                                       "distinct_outcomes", "reached_model", "distinct_findings")}
            print(json.dumps({**brief, "summary": str(self.out / "summary.json"),
                              "findings_dir": str(self.findings_dir)}), flush=True)


def _watchdog(run: Run, limit: float) -> None:
    while True:
        time.sleep(1.0)
        data, since = run.current, run.current_since
        if data is not None and time.monotonic() - since > limit and run.current is data:
            print(f"hang: an input has run for over {limit:.0f} s; saved, stopping", flush=True)
            run.hang(data, time.monotonic() - since)
            os._exit(3)


def _quiet_logs() -> None:
    """Nothing on the console below CRITICAL; the node's loggers still pass ERROR records to the
    target (it reports an exception the node catches and logs as a finding)."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    for h in logging.getLogger().handlers:
        h.setLevel(logging.CRITICAL)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")


def _limit_memory(gb: float) -> int:
    limit = _vm_bytes() + int(gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return limit


def _seed_files(run: Run, corpus: Path) -> list[bytes]:
    seeds = run.fz.seed_corpus()
    run.seeds = len(seeds)
    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (corpus / f"seed-{name}").write_bytes(data)
    return list(seeds.values())


def run_atheris(args: argparse.Namespace, out: Path) -> None:
    import atheris

    with atheris.instrument_imports(include=INSTRUMENTED):
        import fuzzing  # noqa: F401 (instrumented here: pydicom and the node's packages)

    run = Run(args, out, "atheris")
    seeds = _seed_files(run, run.corpus_dir)
    max_len = max(len(s) for s in seeds) + 4096
    # (looked up at each call: Fuzz() replaces atheris.Mutate with libFuzzer's)
    mutator = run.fz.Mutator(byte_mutator=lambda b, n: atheris.Mutate(b, n), max_size=max_len)

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        return mutator(data, random.Random(seed))[:max_size]

    def test_one_input(data: bytes) -> None:
        run.one(data)

    threading.Thread(target=_watchdog, args=(run, args.hang_seconds), daemon=True).start()
    argv = [sys.argv[0], str(run.corpus_dir), f"-seed={args.seed}", f"-max_len={max_len}",
            f"-timeout={int(args.hang_seconds) + 60}", "-rss_limit_mb=0", "-malloc_limit_mb=0",
            f"-max_total_time={int(args.minutes * 60) + 600}", "-print_final_stats=1",
            f"-artifact_prefix={run.findings_dir}/libfuzzer-", "-reload=0"]
    run.findings_dir.mkdir(parents=True, exist_ok=True)
    print(f"atheris {importlib.metadata.version('atheris')}: {' '.join(argv[1:])}", flush=True)
    atheris.Setup(argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def run_random(args: argparse.Namespace, out: Path) -> None:
    run = Run(args, out, "random")
    corpus = _seed_files(run, run.corpus_dir)
    threading.Thread(target=_watchdog, args=(run, args.hang_seconds), daemon=True).start()
    rng = random.Random(args.seed)
    mutator = run.fz.Mutator()
    for data in list(corpus):
        run.one(data)
    while True:
        data = mutator(rng.choice(corpus), rng)
        seen = len(run.outcomes)
        run.one(data)
        if len(run.outcomes) > seen and len(corpus) < 5000:  # a new outcome: keep it to mutate further
            corpus.append(data)
            (run.corpus_dir / f"new-{run.fz.digest(data)}").write_bytes(data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: /tmp/triage-fuzz-<UTC time>)")
    ap.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    ap.add_argument("--slow-seconds", type=float, default=5.0,
                    help="a clean input slower than this is a finding")
    ap.add_argument("--hang-seconds", type=float, default=120.0,
                    help="stop and save an input running this long")
    ap.add_argument("--memory-gb", type=float, default=6.0, help="address space allowed beyond the imports")
    args = ap.parse_args()
    out = args.out or Path(f"/tmp/triage-fuzz-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris
            engine = "atheris"
        except ImportError:
            engine = "random"
    print(f"fuzzing for {args.minutes:g} min with {engine}; output in {out}", flush=True)
    _quiet_logs()
    if engine == "atheris":
        # the imports first (unlimited), then the limit: torch reserves much address space
        import atheris

        with atheris.instrument_imports(include=INSTRUMENTED):
            import fuzzing
        import torch
        print(f"address space limited to {_limit_memory(args.memory_gb) / 1024**3:.1f} GiB", flush=True)
        run_atheris(args, out)
    else:
        import fuzzing  # noqa: F401
        import torch  # noqa: F401
        print(f"address space limited to {_limit_memory(args.memory_gb) / 1024**3:.1f} GiB", flush=True)
        run_random(args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
