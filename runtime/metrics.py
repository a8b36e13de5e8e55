"""Prometheus metrics of the HTTP server (``prometheus_client``): its requests, its runtime calls, the runtime's facts.

Each server has its own registry (several servers may live in one process, e.g. in tests). Latency histograms and
error counters are the server's: it times every runtime call it makes (:meth:`ServerMetrics.operation`). The engine's
counters (requests, images, batches, queue) and the gallery's size are read from :meth:`Runtime.stats` at scrape time
by a custom collector, so nothing is counted twice.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "OPERATIONS", "ServerMetrics"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The runtime calls the server times (label ``op``).
OPERATIONS = ("embed", "search", "explain", "add")

_COUNTERS = (("requests", "Requests run by the inference thread."),
             ("images", "Images run through the model."),
             ("batches", "Engine calls (batches)."),
             ("failed_batches", "Engine calls that raised."),
             ("rejected", "Requests refused because the engine's queue was full or too slow to drain."),
             ("busy_seconds", "Seconds the engine was busy."))


class _RuntimeCollector(Collector):
    """``Runtime.stats()`` as metric families (entries the stats lack are skipped)."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if "backend" in stats:
            info = GaugeMetricFamily("attrimeter_runtime_info", "The serving backend and device (value 1).",
                                     labels=["backend", "device"])
            info.add_metric([str(stats["backend"]), str(stats.get("device", ""))], 1)
            yield info
        for key, name, help_text in (("gallery_size", "attrimeter_gallery_entries", "Entries in the loaded gallery."),
                                     ("queue_depth", "attrimeter_runtime_queue_depth",
                                      "Requests waiting for the inference thread."),
                                     ("queued_images", "attrimeter_runtime_queued_images",
                                      "Images waiting for the inference thread.")):
            if stats.get(key) is not None:
                yield GaugeMetricFamily(name, help_text, value=stats[key])
        for key, help_text in _COUNTERS:
            if stats.get(key) is not None:
                yield CounterMetricFamily(f"attrimeter_runtime_{key}", help_text, value=stats[key])
        sizes = stats.get("batch_sizes")
        if sizes is not None:
            edges = (*BATCH_BUCKETS, float("inf"))
            counts = [0] * len(edges)
            for size, n in sizes.items():
                counts[bisect.bisect_left(edges, int(size))] += int(n)
            yield HistogramMetricFamily(
                "attrimeter_runtime_batch_size", "Images per engine call.",
                buckets=[(floatToGoString(e), c) for e, c in zip(edges, itertools.accumulate(counts), strict=True)],
                sum_value=sum(int(size) * int(n) for size, n in sizes.items()))


class ServerMetrics:
    """The registry of one server: its HTTP counters, its runtime calls' latency and errors, the runtime's stats.

    Args:
        stats: Returns the runtime's counters (``Runtime.stats``).
    """

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("attrimeter_http_requests", "HTTP requests answered, by endpoint, method and code.",
                                ["endpoint", "method", "code"], registry=self.registry)
        self.images = Counter("attrimeter_http_images", "Images received in accepted HTTP requests, by endpoint.",
                              ["endpoint"], registry=self.registry)
        self.latency = Histogram("attrimeter_http_request_duration_seconds",
                                 "Time to answer an HTTP request, by endpoint.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("attrimeter_http_requests_in_flight", "HTTP requests being answered now.",
                               registry=self.registry)
        self.runtime_latency = Histogram("attrimeter_runtime_latency_seconds", "Runtime call latency, by operation.",
                                         ["op"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.runtime_errors = Counter("attrimeter_runtime_errors", "Runtime calls that raised, by operation.", ["op"],
                                      registry=self.registry)
        for op in OPERATIONS:  # every series from the start, at zero
            self.runtime_latency.labels(op)
            self.runtime_errors.labels(op)
        self.registry.register(_RuntimeCollector(stats))

    @contextlib.contextmanager
    def operation(self, op: str) -> Iterator[None]:
        """Time one runtime call and count it as an error when it raises (the exception propagates).

        Args:
            op: One of :data:`OPERATIONS`.
        """
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.runtime_errors.labels(op).inc()
            raise
        finally:
            self.runtime_latency.labels(op).observe(time.perf_counter() - start)

    def observe(self, endpoint: str, method: str, status: int, seconds: float, images: int) -> None:
        """Count one answered request.

        Args:
            endpoint: The route (``"other"`` for unknown paths: bounded label cardinality).
            method: HTTP method.
            status: Status code sent.
            seconds: Time to answer.
            images: Images in the request (0 when refused before they were counted).
        """
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if images:
            self.images.labels(endpoint).inc(images)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The metrics in the format the scraper asked for (text 0.0.4 by default): ``(body, content type)``."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
