"""The server's counters and gauges, written by the engine and HTTP threads, read as Prometheus text (/metrics)."""

from __future__ import annotations

import collections
import threading

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> count
        self.prompt_tokens = self.cached_prompt_tokens = self.generation_tokens = 0
        self.requests_finished = self.requests_cancelled = self.requests_timed_out = 0
        self.decode_steps = self.decode_rows = 0
        self.queue_depth = self.slots_busy = self.slots_total = 0
        self.batch_occupancy = 0.0
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum, self.ttft_n = 0.0, 0

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    self.ttft_counts[i] += 1
            self.ttft_sum += seconds
            self.ttft_n += 1

    def render(self) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        out = []

        def metric(name, kind, help_text, samples):
            out.append(f"# HELP mobilellm_{name} {help_text}")
            out.append(f"# TYPE mobilellm_{name} {kind}")
            for labels, value in samples:
                out.append(f"mobilellm_{name}{labels} {value}")

        with self.lock:
            metric("requests_total", "counter", "HTTP requests by endpoint and status code",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
            metric("prompt_tokens_total", "counter", "prompt tokens admitted", [("", self.prompt_tokens)])
            metric("prompt_tokens_cached_total", "counter", "prompt tokens whose KV a slot already held",
                   [("", self.cached_prompt_tokens)])
            metric("generation_tokens_total", "counter", "tokens generated", [("", self.generation_tokens)])
            metric("requests_finished_total", "counter", "generations that ran to stop or length",
                   [("", self.requests_finished)])
            metric("requests_cancelled_total", "counter", "generations cancelled by a client disconnect",
                   [("", self.requests_cancelled)])
            metric("requests_timed_out_total", "counter", "generations stopped by the per-request timeout",
                   [("", self.requests_timed_out)])
            metric("decode_steps_total", "counter", "batched decode steps", [("", self.decode_steps)])
            metric("decode_rows_total", "counter", "sequences summed over decode steps (/ steps = mean batch)",
                   [("", self.decode_rows)])
            metric("queue_depth", "gauge", "requests waiting for a slot", [("", self.queue_depth)])
            metric("slots_busy", "gauge", "KV slots holding a running request", [("", self.slots_busy)])
            metric("slots_total", "gauge", "KV slots (the most requests decoded together)", [("", self.slots_total)])
            metric("batch_occupancy", "gauge", "rows of the last decode step / slots", [("", self.batch_occupancy)])
            metric("time_to_first_token_seconds", "histogram", "from submission to the first generated token",
                   [(f'_bucket{{le="{b}"}}', c) for b, c in zip(TTFT_BUCKETS, self.ttft_counts)]
                   + [('_bucket{le="+Inf"}', self.ttft_n), ("_sum", round(self.ttft_sum, 6)), ("_count", self.ttft_n)])
        return "\n".join(out) + "\n"
