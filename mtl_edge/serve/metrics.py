"""Prometheus metrics of one server (its own registry, so several apps in one process, as in
the tests, do not mix their counts).

    mtl_edge_requests_total{method, route, status}   HTTP requests answered
    mtl_edge_request_seconds{route}                  whole request, histogram
    mtl_edge_stage_seconds{stage}                    decode | queue | extract | head | commit
                                                     (queue and extract per image batch entry:
                                                     queue per image, extract per backend run)
    mtl_edge_batch_size                              images per backend run, histogram
    mtl_edge_queue_images                            images waiting for the backend, gauge
    mtl_edge_images_total{kind}                      images predicted / enrolled
    mtl_edge_backend_info{backend, provider, ...}    what runs the backbone
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

#: Seconds: from 0.1 ms (the head on a small gallery) to 10 s (a long enrollment).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STAGES = ("decode", "queue", "extract", "head", "commit")


class Metrics:
    """The counters and histograms above, in `registry`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "mtl_edge_requests", "HTTP requests answered.", ["method", "route", "status"],
            registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "mtl_edge_request_seconds", "Whole request latency.", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "mtl_edge_stage_seconds", "Latency of one stage of a request.", ["stage"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "mtl_edge_batch_size", "Images per backend run.", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_images = Gauge(
            "mtl_edge_queue_images", "Images waiting for the backend.", registry=r
        )
        self.images = Counter("mtl_edge_images", "Images processed.", ["kind"], registry=r)
        self.backend = Info("mtl_edge_backend", "The feature extractor.", registry=r)
        for stage in STAGES:  # export every stage from the start, at zero
            self.stage_seconds.labels(stage)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """(the text exposition format, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
