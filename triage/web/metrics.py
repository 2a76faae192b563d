"""``/metrics``: Prometheus figures read from the database when scraped.

The SCP, the executors and the delivery loop run in different processes (and on other
machines in scale-out), so in-process counters would each see only a part; the database
sees everything. Counts of rows that are never deleted are exposed as counters, current
states as gauges, and the analysis and delivery latencies (of the most recent 10 000) as
histograms. No patient identifier or UID is ever a label.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Delivery, Instance, Job, Notification, Result, Series, WorkerBeat, utcnow

__all__ = ["NodeCollector", "registry"]

LATENCY_BUCKETS = (0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 900, 3600)
_RECENT = 10_000


def _histogram(name: str, doc: str, values: Sequence[float], labels: dict[str, str]) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=list(labels))
    counts: list[tuple[str, float]] = []
    ordered = sorted(values)
    i = 0
    for b in LATENCY_BUCKETS:
        while i < len(ordered) and ordered[i] <= b:
            i += 1
        counts.append((str(float(b)), i))
    counts.append(("+Inf", len(ordered)))
    h.add_metric(list(labels.values()), counts, sum_value=float(sum(ordered)))
    return h


class NodeCollector(Collector):
    def __init__(self, db: Database, blobs: BlobStore | None = None, heartbeat_seconds: float = 10.0) -> None:
        self.db = db
        self.blobs = blobs
        self.heartbeat_seconds = heartbeat_seconds

    def collect(self) -> Iterator[Any]:
        with self.db.sessions() as s:
            yield CounterMetricFamily("triage_instances_received", "Instances stored and indexed",
                                      value=s.scalar(select(func.count()).select_from(Instance)) or 0)
            g = GaugeMetricFamily("triage_series", "Series by state", labels=["state"])
            for state, n in s.execute(select(Series.state, func.count()).group_by(Series.state)):
                g.add_metric([state], n)
            yield g
            g = GaugeMetricFamily("triage_jobs", "Jobs by state and kind", labels=["state", "kind"])
            q = select(Job.state, Job.kind, func.count()).group_by(Job.state, Job.kind)
            for state, kind, n in s.execute(q):
                g.add_metric([state, kind], n)
            yield g
            c = CounterMetricFamily("triage_results", "Results by kind and priority",
                                    labels=["kind", "priority"])
            for kind, prio, n in s.execute(select(Result.kind, Result.priority, func.count())
                                           .group_by(Result.kind, Result.priority)):
                c.add_metric([kind, str(prio)], n)
            yield c
            g = GaugeMetricFamily("triage_deliveries", "Deliveries by state and destination",
                                  labels=["state", "destination"])
            for state, dest, n in s.execute(select(Delivery.state, Delivery.destination, func.count())
                                            .group_by(Delivery.state, Delivery.destination)):
                g.add_metric([state, dest], n)
            yield g
            g = GaugeMetricFamily("triage_notifications", "Webhook and HL7 notifications by state",
                                  labels=["state", "channel", "target"])
            for state, channel, target, n in s.execute(
                    select(Notification.state, Notification.channel, Notification.target, func.count())
                    .group_by(Notification.state, Notification.channel, Notification.target)):
                g.add_metric([state, channel, target], n)
            yield g
            g = GaugeMetricFamily("triage_workers", "Workers by kind, heartbeat recent (alive) or not",
                                  labels=["kind", "alive"])
            silent = utcnow() - dt.timedelta(seconds=3 * self.heartbeat_seconds)
            for kind, alive, n in s.execute(
                    select(WorkerBeat.kind, WorkerBeat.last_seen >= silent, func.count())
                    .group_by(WorkerBeat.kind, WorkerBeat.last_seen >= silent)):
                g.add_metric([kind, "true" if alive else "false"], n)
            yield g
            jobs = s.execute(select(Job.kind, Job.created_at, Job.finished_at).where(Job.state == "done")
                             .order_by(Job.id.desc()).limit(_RECENT)).all()
            by_kind: dict[str, list[float]] = {}
            for kind, a, b in jobs:
                if a is not None and b is not None:
                    by_kind.setdefault(kind, []).append((b - a).total_seconds())
            for kind, vals in sorted(by_kind.items()):
                yield _histogram("triage_analysis_latency_seconds",
                                 "Series complete (job queued) to result stored", vals, {"kind": kind})
            sent = s.execute(select(Delivery.created_at, Delivery.delivered_at)
                             .where(Delivery.state == "sent").order_by(Delivery.id.desc())
                             .limit(_RECENT)).all()
            yield _histogram("triage_delivery_latency_seconds",
                             "Result object queued to accepted by the PACS",
                             [(b - a).total_seconds() for a, b in sent if a and b], {})
        if self.blobs is not None:
            u = self.blobs.usage()
            yield GaugeMetricFamily("triage_disk_used_ratio", "Used fraction of the blob store's disk",
                                    value=u.used_fraction)


def registry(db: Database, blobs: BlobStore | None = None,
             heartbeat_seconds: float = 10.0) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(NodeCollector(db, blobs, heartbeat_seconds))
    return reg
