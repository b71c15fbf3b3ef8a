"""``GET /metrics``: the service in the Prometheus text format (prometheus-client).

One registry per app (never the process-wide default), filled by:

* the engine's observer (:mod:`trioflow.observe`): runs started and ended
  by graph and status, step durations by graph and node, checkpoint commit
  latency by store;
* the routes table: HTTP requests by operation and status, with latency;
* gauges read when scraped: runs this process holds, log followers, and the
  unfinished runs in the store (every node's) by status: pending, running,
  waiting (one indexed count per scrape).

Label values are bounded: run ids are never labels, operations are the
routes table's ids, and past :data:`MAX_GRAPHS` graph ids (or
:data:`MAX_NODES` nodes of one graph) further ones are counted under
``other``, so a server that runs any number of graphs keeps a bounded
number of series.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from trioflow import RunStatus, StoreError

if TYPE_CHECKING:
    from trioflow import Engine

UNFINISHED = (RunStatus.PENDING, RunStatus.RUNNING, RunStatus.WAITING)

#: Distinct graph ids with series of their own; the rest are "other".
MAX_GRAPHS = 200
#: Distinct node ids per graph with series of their own; the rest are "other".
MAX_NODES = 100
OTHER = "other"

_STEP_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600)
_COMMIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The app's metrics; also the engine's observer."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.store = type(engine.store).__name__
        self.runs_started = Counter(
            "trioflow_runs_started", "Runs created, by graph", ["graph"], registry=r
        )
        self.runs_ended = Counter(
            "trioflow_runs_ended",
            "Runs this server executed to their end, by graph and status",
            ["graph", "status"],
            registry=r,
        )
        # Steps and commits are observed on the engine's hot path: plain
        # counters here (a bisect and two additions), turned into histograms
        # when scraped. prometheus-client's own Histogram takes a lock per
        # bucket and cost 8 µs per observation on the reference machine.
        self.steps = _Histograms(
            "trioflow_step_duration_seconds",
            "Time in a node's tool, by graph and node",
            ("graph", "node"),
            _STEP_BUCKETS,
        )
        self.commits = _Histograms(
            "trioflow_checkpoint_commit_seconds",
            "From a checkpoint's request to the store's answer, by store",
            ("store",),
            _COMMIT_BUCKETS,
        )
        r.register(_Collect(self.steps, self.commits))
        self._commit = self.commits.child((self.store,))
        self.requests = Counter(
            "trioflow_http_requests",
            "HTTP requests and WebSocket sessions, by operation and status",
            ["operation", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "trioflow_http_request_duration_seconds",
            "Time to answer an HTTP request, by operation",
            ["operation"],
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
        active = Gauge(
            "trioflow_runs_active", "Runs this process holds (pending or running)", registry=r
        )
        active.set_function(lambda: engine.active_runs)
        followers = Gauge(
            "trioflow_log_followers", "WebSocket and SSE log followers open", registry=r
        )
        followers.set_function(lambda: engine.followers)
        self.unfinished = Gauge(
            "trioflow_runs_unfinished",
            "Unfinished runs in the store (every node's), by status; counted when scraped",
            ["status"],
            registry=r,
        )
        self._graphs: dict[str, str] = {}
        #: (graph id, node id) -> its histogram child (``labels()`` costs
        #: microseconds; looked up once per pair, not once per step).
        self._nodes: dict[tuple[str, str], Any] = {}
        self._node_counts: dict[str, int] = {}

    def _graph(self, graph_id: str) -> str:
        label = self._graphs.get(graph_id)
        if label is None:
            label = graph_id if len(self._graphs) < MAX_GRAPHS else OTHER
            if label != OTHER:
                self._graphs[graph_id] = label
        return label

    # -- trioflow.observe.Observer -----------------------------------------------------

    def run_started(self, graph_id: str) -> None:
        self.runs_started.labels(self._graph(graph_id)).inc()

    def run_ended(self, graph_id: str, status: str) -> None:
        self.runs_ended.labels(self._graph(graph_id), status).inc()

    def step(self, graph_id: str, node_id: str, seconds: float) -> None:
        key = (graph_id, node_id)
        child = self._nodes.get(key)
        if child is None:
            graph = self._graph(graph_id)
            known = self._node_counts.get(graph_id, 0)
            node = node_id if graph != OTHER and known < MAX_NODES else OTHER
            child = self.steps.child((graph, node))
            if node != OTHER:
                self._nodes[key] = child
                self._node_counts[graph_id] = known + 1
        child.observe(seconds)

    def commit(self, seconds: float) -> None:
        self._commit.observe(seconds)

    # -- HTTP ----------------------------------------------------------------------------

    def request(self, operation: str, status: int, seconds: float | None) -> None:
        self.requests.labels(operation, str(status)).inc()
        if seconds is not None:
            self.latency.labels(operation).observe(seconds)

    async def count_unfinished(self, engine: Engine) -> None:
        """Count the store's pending, running and waiting runs for the next :meth:`text`.

        While the store cannot answer, the last counts stay (the scrape still succeeds).
        """
        try:
            counts = await engine.count_runs(statuses=UNFINISHED)
        except StoreError:
            return
        for status in UNFINISHED:
            self.unfinished.labels(status.value).set(counts.get(status, 0))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _Child:
    """One label set's histogram: a count per bucket and the sum (no lock: the
    Trio thread is the only writer, and a scrape reads a consistent enough copy)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


class _Histograms:
    def __init__(
        self, name: str, doc: str, labels: tuple[str, ...], bounds: tuple[float, ...]
    ) -> None:
        self.name = name
        self.doc = doc
        self.labels = labels
        self.bounds = bounds
        self.children: dict[tuple[str, ...], _Child] = {}

    def child(self, values: tuple[str, ...]) -> _Child:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = _Child(self.bounds)
        return child

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))
        for values, child in list(self.children.items()):
            running = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(self.bounds, child.counts, strict=False):
                running += count
                buckets.append((repr(float(bound)), running))
            buckets.append(("+Inf", running + child.counts[-1]))
            family.add_metric(list(values), buckets, child.total)
        return family


class _Collect:
    def __init__(self, *histograms: _Histograms) -> None:
        self.histograms = histograms

    def collect(self) -> Iterator[Metric]:
        for histogram in self.histograms:
            yield histogram.family()

    def describe(self) -> Iterator[Metric]:
        for histogram in self.histograms:
            yield HistogramMetricFamily(
                histogram.name, histogram.doc, labels=list(histogram.labels)
            )
