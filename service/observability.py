"""Structured (JSON-lines) logs and Prometheus metrics of the service.

Metrics live in a per-server :class:`prometheus_client.CollectorRegistry` (several servers can run
in one process, e.g. in tests) and are exposed over HTTP on the metrics port.
"""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

ACCESS_LOGGER = "avatar.service.access"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (unix s), level, logger, msg, plus the record's ``fields`` dict."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def use_json_logs(level: int = logging.INFO) -> None:
    """Switch the root logger's handlers to :class:`JsonFormatter` (used by ``avatar serve``)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter())
    root.setLevel(level)


def log_access(fields: dict) -> None:
    """Write one access-log record (per finished RPC)."""
    logging.getLogger(ACCESS_LOGGER).info("rpc", extra={"fields": fields})


class ServiceMetrics:
    """The service's Prometheus metrics (all prefixed ``avatar_``).

    - ``avatar_requests_total{method,code}``: finished RPCs by status code (errors = code != OK)
    - ``avatar_frames_total{method}``: frames sent
    - ``avatar_first_frame_seconds{method}``: request (Render) or first audio (StreamRender) to first frame
    - ``avatar_render_fps{method}``: frames / render wall time per finished render
    - ``avatar_active_streams``: Render + StreamRender calls in flight
    - ``avatar_jobs{state}``: onboarding jobs by state
    """

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("avatar_requests", "Finished RPCs", ["method", "code"], registry=self.registry)
        self.frames = Counter("avatar_frames", "Frames sent", ["method"], registry=self.registry)
        self.first_frame = Histogram(
            "avatar_first_frame_seconds",
            "Latency to the first frame",
            ["method"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
        )
        self.render_fps = Histogram(
            "avatar_render_fps",
            "Frames per second of finished renders",
            ["method"],
            registry=self.registry,
            buckets=(1, 2, 5, 10, 15, 20, 25, 30, 40, 60, 100, 200),
        )
        self.active_streams = Gauge(
            "avatar_active_streams", "Render/StreamRender calls in flight", registry=self.registry
        )
        self.jobs = Gauge("avatar_jobs", "Onboarding jobs by state", ["state"], registry=self.registry)
        self._http = None

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose ``/metrics`` over HTTP; returns the bound port (``port=0`` picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        """Stop the metrics HTTP server."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class Stopwatch:
    """Monotonic seconds since creation."""

    def __init__(self):
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0
