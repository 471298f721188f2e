"""Continuous batching for `sambay serve`: one thread owns the Engine; the event loop talks to it
through Jobs.

    scheduler = Scheduler(load_engine, max_queue=64)   # load_engine() -> Engine, run on the thread
    scheduler.start()                                   # loads in the background, then serves
    job = Job(prompt_ids, params)                       # made on the event loop
    scheduler.submit([job])                             # QueueFull if there is no room
    async for job, out in outputs_of([job]): ...        # increments; the last has finish_reason
    scheduler.cancel(job)                               # the client went away: free its row

The model is not thread-safe, so everything that touches it (prefill, step, cancel) runs on the
scheduler thread. Each iteration runs up to `prefill_budget` prompt tokens of the admitted requests'
prefills (a long prompt a chunk at a time, in a staging row: Engine.begin_request / prefill), then
one decode step of the running rows, so a long prompt arriving delays each running stream by about
one chunk per token instead of its whole prefill (chunked prefill, as vLLM's and llama.cpp's). A
prefilled request joins the batch at the next token boundary; a finished or cancelled one leaves
at once. Jobs admitted together with the same prompt (the n choices of one request) prefill once:
the others fork the first one's row (Engine.fork). The engine's prefix cache means a prompt that
starts like an earlier one prefills only the rest. The text layer
(incremental detokenizing and stop strings: sambay.runtime.text.RequestText, as in TextStream) runs
here too, so a stop string frees its row on the very step that produced it. Results go back to the
event loop in one `call_soon_threadsafe` per step. The counters for GET /metrics are in
sambay/serve/metrics.py.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from sambay.errors import SambayError
from sambay.runtime.engine import Engine, Event
from sambay.runtime.sampling import SamplingParams
from sambay.runtime.text import RequestText
from sambay.serve.metrics import Metrics


class QueueFull(Exception):
    """No room for the request: max_batch_size running and max_queue waiting already."""


class NotAccepting(Exception):
    """The scheduler is not taking requests (still loading, failed to load, or shutting down)."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (id, logprob), most likely first


@dataclass
class Output:
    """What one job produced since its last Output. The last one has finish_reason set
    ("stop", "length", or "error" with `error` saying why and `status` the HTTP status it means:
    400 the request's fault, 500 the server's, 503 shutting down)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0  # generated so far (stop id included, as in usage)
    error: str | None = None
    status: int = 200

    def merge(self, later: Output) -> Output:
        logprobs = None if self.logprobs is None and later.logprobs is None else \
            (self.logprobs or []) + (later.logprobs or [])
        return Output(self.text + later.text, self.token_ids + later.token_ids, logprobs,
                      later.finish_reason, later.completion_tokens, later.error, later.status)


_job_ids = itertools.count()


class Job:
    """One generation (one choice of one HTTP request). Made on the event loop; Outputs arrive in
    `queue` as (job, Output) pairs, so the n jobs of one request can share a queue."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, index: int = 0,
                 queue: asyncio.Queue | None = None):
        self.id = f"job-{next(_job_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.index = index  # the choice index in the response
        self.loop = asyncio.get_running_loop()
        self.queue = queue if queue is not None else asyncio.Queue()
        self.arrival = time.perf_counter()
        self.done = False  # set on the event loop when the last Output is taken
        self.cancelled = False
        # Owned by the scheduler thread.
        self.request = None
        self.text: RequestText | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.leader: Job | None = None  # the job whose prefill this one shares (same prompt)
        # Called on the scheduler thread with (engine request, text) after each token, e.g. a
        # thinking budget that queues forced tokens (sambay.serve.reasoning.ThinkingBudget).
        self.on_token: Callable | None = None


async def outputs_of(jobs: Sequence[Job]) -> AsyncIterator[tuple[Job, Output]]:
    """(job, Output) from jobs sharing one queue until every job has finished; what piled up
    while the reader was busy is merged per job, so a slow client gets fewer, larger chunks."""
    queue = jobs[0].queue
    left = sum(not j.done for j in jobs)
    while left:
        pending = [await queue.get()]
        while not queue.empty():
            pending.append(queue.get_nowait())
        merged: dict[Job, Output] = {}
        for job, out in pending:
            merged[job] = merged[job].merge(out) if job in merged else out
        for job, out in merged.items():
            if out.finish_reason is not None:
                job.done = True
                left -= 1
            yield job, out


# ---------------------------------------------------------------------------------------------
# The scheduler
# ---------------------------------------------------------------------------------------------


class Scheduler:
    """Owns the Engine on one thread and runs continuous batching over it.

    load: makes the Engine (called on the scheduler thread, so a slow load never blocks the
    server). max_queue: how many jobs may wait for a row; submit() raises QueueFull beyond that.
    on_load_error(message) is called (on the thread) if load fails. prefill_budget: prompt tokens
    prefilled per iteration, between two decode steps.
    """

    def __init__(self, load: Callable[[], Engine], max_queue: int, metrics: Metrics | None = None,
                 on_load_error: Callable[[str], None] | None = None, prefill_budget: int = 256):
        if prefill_budget < 1:
            raise SambayError(f"the prefill budget must be at least 1 token, got {prefill_budget}")
        self.prefill_budget = prefill_budget
        self._prefilling: list[Job] = []  # admitted, not decoding yet (scheduler thread only)
        self._load = load
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._on_load_error = on_load_error
        self.engine: Engine | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: dict[str, Job] = {}  # admitted, by job id (changed under _cv)
        self._cancelled: list[Job] = []
        self._stopping = False
        self._threads = torch.get_num_threads()  # the caller's setting, for the new thread
        self._thread = threading.Thread(target=self._main, name="sambay-scheduler", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue the jobs, all or none. Raises QueueFull or NotAccepting."""
        with self._cv:
            if self._stopping or not self.ready.is_set():
                raise NotAccepting("the server is shutting down" if self._stopping else "the model is not loaded")
            capacity = self.engine.max_batch_size + self.max_queue
            if len(self._waiting) + len(self._running) + len(jobs) > capacity:
                raise QueueFull(f"the server is busy: {len(self._running)} requests running and "
                                f"{len(self._waiting)} waiting (at most {self.max_queue}); retry shortly")
            self._waiting.extend(jobs)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job wherever it is; a running one leaves the batch at the next token boundary."""
        with self._cv:
            if job.cancelled or job.done:
                return
            job.cancelled = True
            try:
                self._waiting.remove(job)
            except ValueError:
                if job.id in self._running:
                    self._cancelled.append(job)
                    self._cv.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; every job still waiting or running ends with an error Output."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        # A thread still loading cannot be interrupted; it is a daemon and dies with the process.
        if self.ready.is_set() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- scheduler thread ------------------------------------------------------------------------
    def _main(self) -> None:
        torch.set_num_threads(self._threads)
        try:
            engine = self._load()
        except Exception as e:  # noqa: BLE001 - any failure to load ends the server with its message
            self.load_error = str(e) if isinstance(e, SambayError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, SambayError):
                traceback.print_exc()
            if self._on_load_error:
                self._on_load_error(self.load_error)
            return
        self.metrics.prefix_cache = engine.prefix_cache
        with self._cv:
            self.engine = engine
            if not self._stopping:
                self.ready.set()
        while self._iteration():
            pass
        self._shutdown()

    def _iteration(self) -> bool:
        """Admit waiting jobs, drop cancelled ones, run one decode step. False once stopping."""
        engine = self.engine
        with self._cv:
            while not (self._stopping or self._waiting or self._cancelled or engine.num_active
                       or self._prefilling):
                self._cv.wait()
            if self._stopping:
                return False
            cancelled, self._cancelled = self._cancelled, []
            admitted = []
            while self._waiting and len(self._running) < engine.max_batch_size:
                job = self._waiting.popleft()
                self._running[job.id] = job
                admitted.append(job)
        outputs: list[tuple[Job, Output]] = []
        finished: list[Job] = []
        for job in cancelled:
            if job.request is not None:
                engine.cancel(job.request)
            self._joined(job, outputs, [])  # its followers prefill alone
            finished.append(job)
        try:
            self._group(admitted)
            self._prefill(outputs, finished)
            if engine.num_active:
                self._step(outputs, finished)
        except Exception as e:  # noqa: BLE001 - a bug must not take the server down with it
            traceback.print_exc()
            message = f"internal error while generating ({type(e).__name__}: {e})"
            for job in list(self._running.values()):
                if job not in finished:
                    outputs.append((job, Output(finish_reason="error", error=message, status=500)))
                    finished.append(job)
            self._prefilling.clear()
            engine.reset()
            if engine.prefix_cache is not None:  # a failed call may have left rows half-written
                engine.prefix_cache.clear()
        with self._cv:
            for job in finished:
                self._running.pop(job.id, None)
        self._deliver(outputs)
        return True

    def _group(self, admitted: list[Job]) -> None:
        """Queue the admitted jobs for prefill; one with the prompt of a job not decoding yet
        follows it (forks its row) instead of prefilling."""
        for job in admitted:
            job.leader = next((j for j in self._prefilling if j.leader is None and j.prompt_ids == job.prompt_ids),
                              None)
            self._prefilling.append(job)

    def _prefill(self, outputs: list, finished: list) -> None:
        """Spend up to prefill_budget prompt tokens on the jobs waiting for their prefill, in order
        of arrival; a prompt that fits the rest of the budget is prefilled whole, a longer one is
        begun and continued in the next iterations."""
        budget = self.prefill_budget
        for job in list(self._prefilling):
            if job.leader is not None or job not in self._prefilling:  # a follower, or forked meanwhile
                continue
            if job.request is None:
                if len(job.prompt_ids) <= budget:
                    budget -= len(job.prompt_ids)
                    self._admit(job, outputs, finished, self.engine.add_request)
                    self._joined(job, outputs, finished)
                    continue
                if budget <= 0:
                    break
                if not self._admit(job, outputs, finished, self.engine.begin_request):
                    self._joined(job, outputs, finished)
                    continue
            if budget <= 0:
                break
            todo = job.request.prefill.remaining
            if self.engine.prefill(job.request, budget):
                self._joined(job, outputs, finished)
            budget -= min(todo, budget)

    def _joined(self, job: Job, outputs: list, finished: list) -> None:
        """`job` is prefilled, failed or cancelled: it decodes from now on (or is gone), and its
        followers fork its row (or, without it, prefill alone)."""
        if job in self._prefilling:
            self._prefilling.remove(job)
        for other in [j for j in self._prefilling if j.leader is job]:
            self._prefilling.remove(other)
            other.leader = None
            if job.request is None or job.request not in self.engine.active:  # the leader failed
                self._prefilling.append(other)  # prefill it alone
                continue
            self._admit(other, outputs, finished,
                        lambda prompt, params, request_id: self.engine.fork(job.request, params, request_id))

    def _admit(self, job: Job, outputs: list, finished: list, start: Callable) -> bool:
        """Start `job` with start(prompt, params, request_id) (add, begin or fork). False if it failed."""
        if job.cancelled:
            finished.append(job)
            return False
        try:
            job.request = start(job.prompt_ids, job.params, request_id=job.id)
        except SambayError as e:
            outputs.append((job, Output(finish_reason="error", error=str(e), status=400)))
            finished.append(job)
            return False
        except Exception as e:  # noqa: BLE001 - fail this request only: add_request joins the batch last
            traceback.print_exc()
            outputs.append((job, Output(finish_reason="error", error=f"internal error while prefilling "
                                                                   f"({type(e).__name__}: {e})", status=500)))
            finished.append(job)
            return False
        job.text = RequestText(self.engine.tokenizer, job.params.stop)
        return True

    def _step(self, outputs: list, finished: list) -> None:
        events = self.engine.step()
        now = time.perf_counter()
        for ev in events:
            job = self._running[ev.request_id]
            if job.first_token_at is None:
                job.first_token_at = now
                self.metrics.first_token(now - job.arrival, len(job.prompt_ids))
            else:
                self.metrics.token_gap(now - job.last_token_at)
            job.last_token_at = now
            out = self._text(job, ev)
            outputs.append((job, out))
            if out.finish_reason is not None:
                finished.append(job)
        self.metrics.generated(len(events), now)

    def _text(self, job: Job, ev: Event) -> Output:
        """One token's Output: its text, cut at a stop string (which also ends the request)."""
        piece = job.text.push(ev)
        if job.on_token is not None:
            job.on_token(job.request, piece)
        finish = ev.finish_reason
        if job.text.stopped:
            self.engine.cancel(job.request)  # a no-op if it just finished anyway
            finish = "stop"
        logprobs = None
        if ev.logprob is not None:
            logprobs = [TokenLogprob(ev.token_id, ev.logprob, list(ev.top_logprobs or []))]
        return Output(piece, [ev.token_id], logprobs, finish, len(job.request.output_ids))

    def _deliver(self, outputs: list[tuple[Job, Output]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, out in outputs:
            by_loop.setdefault(job.loop, []).append((job, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _shutdown(self) -> None:
        with self._cv:
            jobs = list(self._running.values()) + list(self._waiting)
            self._waiting.clear()
            self._running.clear()
        self.engine.reset()
        self._deliver([(j, Output(finish_reason="error", error="the server is shutting down", status=503))
                       for j in jobs])


def _put_all(items: list[tuple[Job, Output]]) -> None:
    for job, out in items:
        job.queue.put_nowait((job, out))
