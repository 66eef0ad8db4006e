"""The gateway's Prometheus metrics (``GET /metrics``), in a registry of its own.

Counters and histograms are updated by the request threads (``prometheus_client`` metrics are
thread-safe); the session gauges are read from the pool at scrape time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sessions import SessionPool

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Seconds: a token's wait on a CPU trunk is milliseconds, a long reply's a minute."""


class GatewayMetrics:
    """What ``splitlm serve`` has done, for Prometheus.

    Attributes mirror the exported names (``splitlm_serve_*``): ``requests`` by endpoint and
    HTTP status; ``prompt_tokens`` and ``completion_tokens`` as OpenAI's ``usage`` counts them;
    ``stepped`` the prompt positions actually sent through the trunk (a prompt that extends a
    kept prefix steps only its new tokens); ``ttft`` and ``latency`` per request; ``delivery`` per
    streamed token, from its sampling to its chunk sent (the gateway's own cost per token).
    """

    def __init__(self, pool: SessionPool) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("splitlm_serve_requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("splitlm_serve_prompt_tokens", "Prompt tokens of the replies (usage).",
                                     registry=r)
        self.completion_tokens = Counter("splitlm_serve_completion_tokens", "Tokens generated (usage).",
                                         registry=r)
        self.stepped = Counter("splitlm_serve_prompt_positions_stepped",
                               "Prompt positions stepped through the trunk (the rest came from kept sessions).",
                               registry=r)
        self.ttft = Histogram("splitlm_serve_ttft_seconds", "Request received to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("splitlm_serve_request_seconds", "Request received to reply finished.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.delivery = Histogram(
            "splitlm_serve_token_delivery_seconds",
            "A streamed token's way through the gateway: sampled (worker thread) to its chunk sent.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1), registry=r)
        self.disconnects = Counter("splitlm_serve_client_disconnects",
                                   "Streamed replies stopped because the client went away.", registry=r)

        def stat(name: str, help: str, key: str) -> None:
            g = Gauge(name, help, registry=r)
            g.set_function(lambda: float(getattr(pool.stats(), key)))

        stat("splitlm_serve_sessions_in_use", "Trunk sessions serving a request now.", "in_use")
        stat("splitlm_serve_sessions_kept", "Trunk sessions kept for a conversation's next turn.", "kept")
        stat("splitlm_serve_sessions_kept_bytes", "Estimated cache bytes of the kept sessions.", "kept_bytes")
        stat("splitlm_serve_sessions_opened", "Trunk sessions opened so far.", "opened")
        stat("splitlm_serve_prefix_hits", "Requests that reused a kept session's prefix.", "hits")
        stat("splitlm_serve_prefix_reused_tokens", "Prompt tokens not stepped thanks to kept prefixes.",
             "reused_tokens")
        stat("splitlm_serve_sessions_evicted", "Kept sessions closed to stay within --keep-bytes.", "evicted")

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    @property
    def content_type(self) -> str:
        from prometheus_client import CONTENT_TYPE_LATEST

        return CONTENT_TYPE_LATEST
