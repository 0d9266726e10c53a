"""Prometheus metrics of `glmgym chat serve` (`GET /metrics`), through `prometheus-client`.

Each app has its own registry, so that several apps in one process (tests) do not collide.
Names follow Prometheus conventions (`_total` counters, `_seconds` histograms, a `glmgym_` prefix).
"""

from __future__ import annotations

from glmgym.chat.serving.engine import Engine, EngineObserver
from glmgym.errors import import_extra

__all__ = ["PrometheusObserver"]

# seconds: from a fast CPU token to a slow long prompt
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class PrometheusObserver(EngineObserver):
    """Engine hooks that feed a registry; `bind(engine)` adds the queue and batch gauges."""

    def __init__(self) -> None:
        prom = import_extra("prometheus_client", "serve")
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("glmgym_requests", "Requests by how they ended.", ["status"], registry=r)
        self.prompt_tokens = prom.Counter("glmgym_prompt_tokens", "Prompt tokens of admitted requests.",
                                          registry=r)
        self.generated_tokens = prom.Counter("glmgym_generated_tokens", "Tokens generated.", registry=r)
        self.ttft = prom.Histogram("glmgym_time_to_first_token_seconds",
                                   "From a request's arrival to its first token.", buckets=_TTFT_BUCKETS,
                                   registry=r)
        self.tpot = prom.Histogram("glmgym_time_per_output_token_seconds",
                                   "Between two tokens of one answer.", buckets=_TPOT_BUCKETS, registry=r)
        self.queue = prom.Gauge("glmgym_queue_length", "Requests waiting for a row.", registry=r)
        self.rows = prom.Gauge("glmgym_running_rows", "Rows in the running batch.", registry=r)
        self.max_rows = prom.Gauge("glmgym_max_batch", "Rows the running batch may hold.", registry=r)

    def bind(self, engine: Engine) -> None:
        """Read the gauges from `engine` at each scrape."""
        self.queue.set_function(lambda: engine.waiting)
        self.rows.set_function(lambda: engine.running_rows)
        self.max_rows.set(engine.max_batch)

    def refused(self, status: str) -> None:
        """A request refused before it reached the engine ("rejected": 429, "unavailable": 503)."""
        self.requests.labels(status).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The metrics page and its content type."""
        prom = import_extra("prometheus_client", "serve")
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST

    # EngineObserver
    def prompt(self, tokens: int) -> None:
        self.prompt_tokens.inc(tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generated_tokens.inc()

    def next_token(self, seconds: float) -> None:
        self.tpot.observe(seconds)
        self.generated_tokens.inc()

    def finished(self, status: str) -> None:
        self.requests.labels(status).inc()
