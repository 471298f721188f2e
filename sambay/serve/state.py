"""The server's one mutable object, ServerState: its settings, metrics and scheduler, and once loaded
the model's ModelInfo. Loading happens here too, on the scheduler thread: load the model, size the
engine to --max-batch-size rows of --max-model-len tokens, and warm it up before /health says 200.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from sambay.errors import SambayError
from sambay.runtime.engine import Engine, text_stop_ids
from sambay.runtime.load import load_for_inference
from sambay.runtime.sampling import SamplingParams, generation_defaults
from sambay.serve.metrics import Metrics
from sambay.serve.protocol import APIError, ModelInfo
from sambay.serve.responses import TokenText
from sambay.serve.scheduler import Job, NotAccepting, QueueFull, Scheduler
from sambay.serve.settings import DEFAULT_MAX_MODEL_LEN, Settings, served_name


class ServerState:
    """The server's one mutable object: settings, metrics, the scheduler and (once loaded) the model."""

    def __init__(self, settings: Settings, load_model: Callable[[], tuple] | None = None):
        self.settings = settings
        # () -> (model, tokenizer), run on the scheduler thread; the default loads settings.model.
        self._load_model = load_model or (lambda: load_for_inference(
            settings.model, dtype=settings.dtype, quantize=settings.quantize, random_weights=settings.random_weights))
        self.model_name = served_name(settings)
        self.created = int(time.time())
        self.metrics = Metrics()
        self.info: ModelInfo | None = None
        self.text_of: TokenText | None = None
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.url = f"http://{host}:{settings.port}"
        self.on_load_error = None  # set by serve(): stops the server
        self.scheduler = Scheduler(self._load, settings.max_queue, self.metrics, self._load_failed,
                                   prefill_budget=settings.prefill_chunk)

    def _load(self) -> Engine:
        """Runs on the scheduler thread: load, size the engine, warm it up."""
        s = self.settings
        if s.load_delay:
            time.sleep(s.load_delay)
        model, tokenizer = self._load_model()
        context = model.config.max_position_embeddings
        if s.max_model_len is not None and s.max_model_len > context:
            raise SambayError(f"--max-model-len {s.max_model_len} is beyond the model's context of {context} "
                              f"tokens; lower it")
        max_len = s.max_model_len or min(context, DEFAULT_MAX_MODEL_LEN)
        engine = Engine(model, tokenizer, max_batch_size=s.max_batch_size, max_length=max_len,
                        prefill_chunk=s.prefill_chunk, prefix_cache_mb=s.prefix_cache_mb)
        stops = text_stop_ids(engine.model, engine.tokenizer)
        engine.run([[stops[0] if stops else 0]], SamplingParams(max_new_tokens=2))  # builds kernels
        if engine.prefix_cache is not None:
            engine.prefix_cache.clear()  # the warm-up is nobody's prefix
        self.text_of = TokenText(tokenizer)
        self.info = ModelInfo(tokenizer, model.config.vocab_size, max_len, min(s.max_tokens or max_len, max_len - 1),
                              stops, generation_defaults(model.generation_config))
        state_mb = engine.state.nbytes() / 2**20
        print(f"sambay: ready: {self.model_name} on {self.url}/v1 (batch {s.max_batch_size}, "
              f"{max_len} tokens per request, decode state {state_mb:.0f} MiB)", file=sys.stderr, flush=True)
        return engine

    def begin_shutdown(self) -> None:
        """SIGINT/SIGTERM: in-flight requests get --shutdown-timeout seconds, then are ended."""
        print(f"sambay: shutting down; running requests get {self.settings.shutdown_timeout:g} s to finish",
              file=sys.stderr, flush=True)
        timer = threading.Timer(self.settings.shutdown_timeout, self.scheduler.stop)
        timer.daemon = True
        timer.start()

    def _load_failed(self, message: str) -> None:
        print(f"sambay: error: {message}", file=sys.stderr, flush=True)
        if self.on_load_error:
            self.on_load_error()

    # ---- used by the handlers --------------------------------------------------------------------
    def ready_info(self) -> ModelInfo:
        if not self.scheduler.ready.is_set():
            raise APIError(503, "the model is still loading; retry when GET /health returns 200",
                           type="server_error", code="model_loading")
        return self.info

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.model_name!r} "
                                f"(see GET /v1/models)", param="model", code="model_not_found")

    def model_card(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "sambay"}
        if self.info is not None:
            card["max_model_len"] = self.info.max_model_len
        return card

    def submit(self, jobs: list[Job]) -> None:
        if len(jobs) > self.settings.capacity:
            raise APIError(400, f"{len(jobs)} choices (prompts x n) are more than this server can hold at once "
                                f"({self.settings.capacity}); send fewer", param="n")
        try:
            self.scheduler.submit(jobs)
        except QueueFull as e:
            raise APIError(429, str(e), type="server_overloaded", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except NotAccepting as e:
            raise APIError(503, str(e), type="server_error") from None
