"""The counters behind GET /metrics (Prometheus text): requests by endpoint and status, tokens
prefilled and generated, time to first token, the queue and the running batch.

The event loop counts requests and the scheduler thread counts tokens, so every update holds one
lock; rendering copies the counters under it and formats outside.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW = 10.0  # seconds over which the generation rate gauge averages


class Metrics:
    """Counters for GET /metrics, updated from the event loop and the scheduler thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per decode step
        self.max_gap = 0.0  # the largest time between two tokens of one stream
        self.prefix_cache = None  # the engine's PrefixCache once loaded (it counts for itself)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        with self._lock:
            self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
            self.ttft_sum += seconds
            self.prompt_tokens += prompt_tokens

    def generated(self, n: int, now: float) -> None:
        with self._lock:
            self.generation_tokens += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()

    def token_gap(self, seconds: float) -> None:
        with self._lock:
            self.max_gap = max(self.max_gap, seconds)

    def generation_rate(self, now: float) -> float:
        """Generated tokens per second over the last RATE_WINDOW seconds."""
        with self._lock:
            total = sum(n for t, n in self._recent if t >= now - RATE_WINDOW)
        return total / RATE_WINDOW

    def render(self, queue_depth: int, running: int, loaded: bool) -> str:
        """The Prometheus text exposition format."""
        now = time.perf_counter()
        rate = self.generation_rate(now)
        lines = []

        def metric(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                         for labels, value in samples)

        with self._lock:
            requests = sorted(self.requests.items())
            ttft, ttft_sum = list(self.ttft_counts), self.ttft_sum
            prompt, generation = self.prompt_tokens, self.generation_tokens
            max_gap, cache = self.max_gap, self.prefix_cache
        counts = cache.counters() if cache is not None else None
        metric("sambay_requests_total", "counter", "HTTP requests by endpoint and status code.",
               [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in requests])
        metric("sambay_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", prompt)])
        metric("sambay_generation_tokens_total", "counter", "Tokens generated.", [("", generation)])
        metric("sambay_queue_depth", "gauge", "Requests waiting for a batch row.", [("", queue_depth)])
        metric("sambay_running_requests", "gauge", "Requests in the running batch.", [("", running)])
        metric("sambay_model_loaded", "gauge", "1 once the model is loaded.", [("", int(loaded))])
        metric("sambay_generation_tokens_per_second", "gauge",
               f"Generated tokens per second over the last {RATE_WINDOW:g} s.", [("", float(rate))])
        metric("sambay_max_inter_token_gap_seconds", "gauge",
               "The largest time between two consecutive tokens of one stream.", [("", float(max_gap))])
        if counts is not None:
            metric("sambay_prefix_cache_hits_total", "counter", "Prompts that restored a cached prefix.",
                   [("", counts["hits"])])
            metric("sambay_prefix_cache_misses_total", "counter", "Prompts with no cached prefix.",
                   [("", counts["misses"])])
            metric("sambay_prefix_cache_hit_tokens_total", "counter", "Prompt tokens restored, not prefilled.",
                   [("", counts["hit_tokens"])])
            metric("sambay_prefix_cache_bytes", "gauge", "Bytes the prefix cache holds.", [("", counts["bytes"])])
            metric("sambay_prefix_cache_budget_bytes", "gauge", "The prefix cache's budget (--prefix-cache-mb).",
                   [("", counts["budget"])])
        cumulative = list(itertools.accumulate(ttft))
        metric("sambay_time_to_first_token_seconds", "histogram",
               "Time from a request's arrival to its first generated token.",
               [(f'_bucket{{le="{b:g}"}}', c) for b, c in zip(TTFT_BUCKETS, cumulative)]
               + [('_bucket{le="+Inf"}', cumulative[-1]), ("_sum", float(ttft_sum)), ("_count", cumulative[-1])])
        return "\n".join(lines) + "\n"

