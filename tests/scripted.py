"""A scripted stand-in model served in-process: the real app, scheduler and engine, with a model
whose logits force a known reply, so what the server makes of that reply can be checked exactly."""

from __future__ import annotations

import threading
import time
import urllib.request

import torch
import uvicorn

import sambay
from sambay.serve.app import create_app
from sambay.serve.server import listen
from sambay.serve.settings import Settings
from sambay.serve.state import ServerState


class ScriptedModel:
    """Runs a real tiny model (so the decode state works as usual) but replaces its logits: after a
    chat prompt (the call that feeds `<|assistant|>`: a prefix cache may have restored the rest) it
    forces the tokens of `script(text fed in that call)` one by one, then `end_id`; text the prompt
    already put after `<|assistant|>` (a forced reply prefix) counts as the script's start. A reply
    that starts without a call (its prompt and first logits restored from the prefix cache) replays
    the last script. One row only."""

    def __init__(self, inner, tokenizer, script, end_id: int):
        self.inner, self.tokenizer, self.script, self.end_id = inner, tokenizer, script, end_id
        self.assistant_id = tokenizer.token_to_id("<|assistant|>")
        self._ids: list[int] = []
        self._k = 0

    def __getattr__(self, name):  # config, new_state, generation_config, ops, ... are the model's
        return getattr(self.inner, name)

    def __call__(self, input_ids, state=None, **kw):
        out = self.inner(input_ids, state=state, **kw)
        fed = input_ids[0].tolist()
        if self.assistant_id in fed:
            start = len(fed) - fed[::-1].index(self.assistant_id)
            self._ids = self.tokenizer.encode(self.script(self.tokenizer.decode(fed)))
            self._k = len(fed) - start
        elif self._k >= len(self._ids):  # a new reply whose prompt and first logits came from a prefix cache
            self._k = 1
        else:
            self._k += 1
        tok = self._ids[self._k] if self._k < len(self._ids) else self.end_id
        forced = torch.full_like(out, -1e4)
        forced[..., tok] = 1e4
        return forced


def scripted_model(script):
    """(ScriptedModel, tokenizer): the embedded model's tokenizer over a random tiny SambaY."""
    tok = sambay.load_tokenizer()
    cfg = sambay.preset("tiny").replace(vocab_size=tok.vocab_size, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    inner = sambay.build_model(cfg, seed=0).eval()
    return ScriptedModel(inner, tok, script, tok.token_to_id("<|end|>")), tok


class InProcessServer:
    """The app on a loopback port, in a thread of this process, serving `load_model()`'s model."""

    def __init__(self, load_model, **settings):
        sock = listen("127.0.0.1", 0)
        if "prefix_cache_mb" in Settings.__dataclass_fields__:  # a restored prefix would hide the prompt
            settings.setdefault("prefix_cache_mb", 0)
        self.settings = Settings(port=sock.getsockname()[1], max_batch_size=1, access_log=False,
                                 served_model_name="scripted", **settings)
        self.url = f"http://127.0.0.1:{self.settings.port}"
        self.state = ServerState(self.settings, load_model=load_model)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.settings, self.state), log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the in-process server did not get ready"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
