"""The server's Prometheus metrics, with a bounded set of series.

Requests are labelled by route template (``/predict``, never the path a client sent: a path
matching no route is ``unmatched``) and by status class (``2xx`` ... ``5xx``); refusals by the
field with its indices dropped (``items[].image``). Scores go to a histogram with the fixed
edges :data:`mmcore.evaluation.metrics.SCORE_BUCKETS` and positive predictions to a counter,
both per ``model_version``, what one watches for drift.
"""

from __future__ import annotations

import re

from mmcore.evaluation.metrics import SCORE_BUCKETS

UNMATCHED = "unmatched"
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_INDEX = re.compile(r"\[\d+\]")


def status_class(code):
    """200 -> "2xx"; anything outside 100..599 counts as "5xx"."""
    return f"{code // 100}xx" if 100 <= code < 600 else "5xx"


def route_label(request):
    """The template of the route that answered ``request`` (after routing), else ``unmatched``."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or UNMATCHED


def field_label(field):
    """A refused field without its indices: ``items[3].image`` -> ``items[].image``."""
    return _INDEX.sub("[]", field) if field else "none"


class ServeMetrics:
    """The collectors of one server process, in their own registry."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("mmcore_requests", "HTTP requests answered, by route template and status class",
                                ["route", "status"], registry=self.registry)
        self.errors = Counter("mmcore_request_errors", "Requests refused, by route template and field",
                              ["route", "field"], registry=self.registry)
        self.latency = Histogram("mmcore_request_latency_seconds", "Request latency by route template", ["route"],
                                 registry=self.registry, buckets=LATENCY_BUCKETS)
        self.batch_sizes = Histogram("mmcore_batch_size", "Rows per forward pass", registry=self.registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_seconds = Histogram("mmcore_batch_seconds", "Seconds per forward pass", registry=self.registry)
        self.scores = Histogram("mmcore_calibrated_score", "Calibrated scores answered, by model version",
                                ["model_version"], registry=self.registry, buckets=SCORE_BUCKETS)
        self.positives = Counter("mmcore_positive_predictions", "Rows predicted positive, by model version",
                                 ["model_version"], registry=self.registry)

    def answered(self, route, status, seconds):
        """Count one answered request."""
        self.requests.labels(route, status_class(status)).inc()
        self.latency.labels(route).observe(seconds)

    def refused(self, route, field):
        """Count one client mistake."""
        self.errors.labels(route, field_label(field)).inc()

    def model_loaded(self, model_version):
        """Start the model's score series at zero, so a dashboard sees every bucket before the first answer."""
        self.scores.labels(model_version)
        self.positives.labels(model_version)

    def scored(self, model_version, calibrated, predicted):
        """Count the calibrated scores and positive predictions of scored rows."""
        histogram = self.scores.labels(model_version)
        for value in calibrated:
            histogram.observe(float(value))
        positives = int(sum(bool(p) for p in predicted))
        self.positives.labels(model_version).inc(positives)

    def batch(self, size, seconds):
        """Count one forward pass."""
        self.batch_sizes.observe(size)
        self.batch_seconds.observe(seconds)

    def exposition(self):
        """``(body, content type)`` of ``GET /metrics``."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
