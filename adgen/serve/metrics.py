"""`/metrics` in Prometheus' text format, with the `prometheus_client` library.

One registry per server (not the library's global one), so several apps in one process (tests) never
share counters. Batch rows are counted by outcome and batches by status (`watch_batches`). The scheduler reports what happens to requests (`ServeMetrics.started / first_token /
finished`); queue depth, running requests and decode steps are read from it when scraped.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from adgen.serve.batches.store import ACTIVE, FINAL

# seconds: from a fraction of a decode step to a long completion on a CPU
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("adgen_requests", "Generation requests by how they ended",
                                ["kind", "outcome"], registry=r)
        self.prompt_tokens = Counter("adgen_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("adgen_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("adgen_time_to_first_token_seconds", "From arrival to the first generated token",
                              ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("adgen_request_latency_seconds", "From arrival to the last token",
                                 ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.batches = Gauge("adgen_batches", "Batches (the Batch API) by status", ["status"], registry=r)
        self.batch_rows = Counter("adgen_batch_rows", "Batch rows finished, by outcome (completed: a 200)",
                                  ["outcome"], registry=r)
        self.queue_depth = Gauge("adgen_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("adgen_running_requests", "Requests decoding now (the batch size)", registry=r)
        self.decode_steps = Gauge("adgen_decode_steps", "Decode steps run by the engine", registry=r)
        self.prefix_saved = Gauge("adgen_prefix_tokens_saved", "Prompt tokens the prefix cache did not recompute",
                                  registry=r)

    def watch_batches(self, store) -> None:
        """Batches by status, read from the batch store (adgen.serve.batches) at scrape time."""
        for status in ACTIVE + FINAL:
            self.batches.labels(status).set_function(lambda s=status: store.count(s))

    def batch_row(self, outcome: str) -> None:
        self.batch_rows.labels(outcome).inc()

    def watch(self, scheduler) -> None:
        """Read the scheduler's live figures at scrape time."""
        self.queue_depth.set_function(lambda: scheduler.stats()["queued"])
        self.running.set_function(lambda: scheduler.stats()["running_requests"])
        self.decode_steps.set_function(lambda: scheduler.stats()["decode_steps"] or 0)
        self.prefix_saved.set_function(lambda: scheduler.stats()["prefix_tokens_saved"] or 0)

    # called by the scheduler (worker thread) with the job's arrival time
    def first_token(self, kind: str, created: float) -> None:
        self.ttft.labels(kind).observe(time.monotonic() - created)

    def finished(self, kind: str, outcome: str, created: float, prompt_tokens: int = 0, generated: int = 0) -> None:
        self.requests.labels(kind, outcome).inc()
        if outcome == "completed":
            self.latency.labels(kind).observe(time.monotonic() - created)
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
