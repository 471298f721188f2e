"""The server's scheduler on a real engine: a long prompt is prefilled in budgeted pieces between the
running streams' tokens, identical prompts arriving together prefill once, and /metrics' counters
(largest inter-token gap, prefix cache) are filled."""

import asyncio

import pytest
import torch

import sambay
from sambay.runtime.engine import Engine
from sambay.runtime.sampling import SamplingParams
from sambay.serve.metrics import Metrics
from sambay.serve.scheduler import Job, Scheduler, outputs_of
from sambay.tokenizer.loading import load_tokenizer

from conftest import GOLDEN  # noqa: E402 - the shared path

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = [(7 * i + 3) % 500 + 1 for i in range(200)]
SHORT = [5, 17, 200]


@pytest.fixture(scope="module")
def model():
    return sambay.load_model(GOLDEN, dtype=torch.float32)


class CountingEngine(Engine):
    """Counts the decode steps run while a prompt was still being prefilled."""

    steps_while_prefilling = 0

    def step(self):
        self.steps_while_prefilling += bool(self.pending)
        return super().step()


def greedy(n):
    return SamplingParams(max_new_tokens=n, stop_token_ids=[])


def run(model, batches, budget=16, mb=0.0, rows=4):
    """Submit each batch of (prompt, params) after the previous one's first token; returns every
    job's tokens and the order in which (job index, token) arrived."""
    async def main():
        metrics = Metrics()
        tokenizer = load_tokenizer(None)  # the embedded model's (4096 ids, as the golden model's vocabulary)
        sched = Scheduler(lambda: CountingEngine(model, tokenizer, max_batch_size=rows, max_length=512, prefill_chunk=16,
                                         prefix_cache_mb=mb), max_queue=8, metrics=metrics, prefill_budget=budget)
        sched.start()
        while not sched.ready.is_set():
            await asyncio.sleep(0.01)
        queue: asyncio.Queue = asyncio.Queue()
        jobs, arrivals = [], []
        for batch in batches:
            new = [Job(p, params, index=len(jobs) + i, queue=queue) for i, (p, params) in enumerate(batch)]
            jobs += new
            sched.submit(new)
            for _ in range(30_000):  # at most 30 s
                if any(j.first_token_at or j.request and j.request.finished for j in new):
                    break
                await asyncio.sleep(0.001)
        tokens = {j.index: [] for j in jobs}
        async for job, out in outputs_of(jobs):
            tokens[job.index] += out.token_ids
            arrivals += [(job.index, t) for t in out.token_ids]
        engine = sched.engine
        sched.stop()
        return [tokens[i] for i in range(len(jobs))], jobs, engine, metrics
    return asyncio.run(main())


def alone(model, prompt, params):
    return Engine(model, max_length=512, prefix_cache_mb=0).run([prompt], params)[0].output_ids


def test_a_long_prompt_is_prefilled_between_the_running_streams_tokens(model):
    tokens, jobs, engine, metrics = run(model, [[(SHORT, greedy(40))], [(LONG, greedy(5))]], budget=16)
    assert tokens == [alone(model, SHORT, greedy(40)), alone(model, LONG, greedy(5))]
    # 200 prompt tokens at 16 per iteration: the running stream got a token in each of them.
    assert engine.steps_while_prefilling == len(LONG) // 16
    assert metrics.max_gap > 0
    assert "sambay_max_inter_token_gap_seconds" in metrics.render(0, 0, True)


def test_identical_prompts_arriving_together_prefill_once(model):
    params = [SamplingParams(max_new_tokens=8, temperature=0.8, seed=s, stop_token_ids=[]) for s in range(4)]
    tokens, jobs, engine, _ = run(model, [[(LONG, p) for p in params]], budget=64)
    assert tokens == [alone(model, LONG, p) for p in params]
    cached = sorted(j.request.stats.cached_tokens for j in jobs)
    assert cached == [0, len(LONG), len(LONG), len(LONG)]  # one prefill, three forks


def test_prefix_cache_counts_on_metrics(model):
    follow = LONG + [9, 9, 9]
    tokens, jobs, engine, metrics = run(model, [[(LONG, greedy(3))], [(follow, greedy(3))]], mb=16)
    assert tokens[1] == alone(model, follow, greedy(3))
    assert jobs[1].request.stats.cached_tokens >= 192
    text = metrics.render(0, 0, True)
    assert "sambay_prefix_cache_hits_total 1" in text and "sambay_prefix_cache_misses_total 1" in text
    held = int(next(line for line in text.splitlines() if line.startswith("sambay_prefix_cache_bytes ")).split()[1])
    assert 0 < held <= 16 * 2**20
