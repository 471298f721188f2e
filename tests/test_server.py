"""`sambay serve` as a user meets it: a real server process on a loopback port, driven with the
official openai client and with raw HTTP for what the client hides (error bodies, SSE framing).

The model is the `tiny` preset with a small BPE tokenizer, trained for a few seconds on the English
below so that its greedy text depends on the prompt (a random model only repeats the last token,
which would let mixed-up batch rows go unnoticed) and its chat replies end with <|end|>.
"""

import http.client
import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import openai
import pytest
import torch

import sambay
from sambay.bench.serve import spawn, wait_ready
from sambay.cli import build_parser, main
from sambay.kernels import prepare_for_inference
from sambay.runtime.checkpoint import DEFAULT_MODEL_DIR
from sambay.runtime.engine import Engine
from sambay.runtime.sampling import SamplingParams
from sambay.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelInfo, sampling_params
from sambay.tokenizer import train_bpe_tokenizer

# One CPU thread: the tiny model is many times faster on one, and the server is told --threads 1.
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 512
STOP_IDS = [0, 4]  # <|endoftext|> (the config's eos) and <|end|> (the end of a chat turn)
ENGLISH = """The old lighthouse keeper climbed the winding stairs every evening to light the lamp.
Ships passing in the night would see the beam sweep across the dark water and know the rocks were near.
In the morning he walked along the shore, collecting driftwood and watching the gulls argue over fish.
Children from the village sometimes visited him, asking for stories about storms and shipwrecks.
He told them about the winter when the sea froze near the harbour and the boats could not leave.
A good story needs a beginning, a middle and an end, he would say, and a little bit of weather.
The baker opened her shop before sunrise, and the smell of fresh bread drifted down the street.
Farmers brought apples, cheese and eggs to the market square, where people talked about the news.
Rain fell softly on the roofs while the river carried leaves past the mill and under the stone bridge.
Reading a book by the fire on a cold night is one of the simplest pleasures there is.
Computers follow instructions exactly, which is why a small mistake in a program can cause a big problem.
Good software is tested carefully, written clearly, and explained in plain words for the next person.
"""
CHATS = [("What does the keeper do?", "He lights the lamp every evening."),
         ("Where is the bread from?", "The baker made it before sunrise."),
         ("Tell me about the river.", "It carries leaves past the mill."),
         ("Hello!", "Hello, how can I help?"),
         ("What do farmers sell?", "Apples, cheese and eggs.")]
PROMPTS = ["The old lighthouse keeper", "Rain fell softly", "Computers follow", "A good story needs",
           "Farmers brought", "Children from the village", "The baker opened", "Reading a book"]


def chat_text() -> str:
    return "".join(f"<|user|>{q}<|end|><|assistant|>{a}<|end|>" for q, a in CHATS)


def build_tiny_folder(folder: Path, steps: int = 120) -> Path:
    """The tiny preset with a trained BPE tokenizer, trained for a few seconds, saved to `folder`."""
    tok = train_bpe_tokenizer([ENGLISH, chat_text()] * 2, vocab_size=VOCAB)
    cfg = sambay.preset("tiny").replace(vocab_size=VOCAB, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = sambay.build_model(cfg, seed=0).train()
    texts = [torch.tensor(tok.encode(ENGLISH)), torch.tensor(tok.encode(chat_text() * 3))]
    opt = torch.optim.AdamW(model.parameters(), lr=6e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    T = 32
    for _ in range(steps):
        rows = []
        for ids in texts * 2:  # each batch: two windows of prose, two of chats
            s = int(torch.randint(0, len(ids) - T - 1, (1,), generator=g))
            rows.append(ids[s:s + T + 1])
        batch = torch.stack(rows)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return sambay.save_model(model.eval(), folder, tokenizer=tok)


def tiny_folder(tmp_path_factory) -> Path:
    """Built once per test session (shared with test_server_load.py; both run on one_thread)."""
    folder = tmp_path_factory.getbasetemp() / "sambay-tiny-server-model"
    if not (folder / "model.safetensors").exists():
        build_tiny_folder(folder)
    return folder


# ---- talking to a server ---------------------------------------------------------------------------


def request(url: str, method: str, path: str, body=None, headers=None, timeout: float = 60):
    """(status, headers, body bytes). body: bytes as they are, anything else as JSON."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return out


def post(url: str, path: str, body, headers=None):
    status, _, data = request(url, "POST", path, body, headers)
    return status, json.loads(data)


def sse(url: str, path: str, body: dict, headers=None) -> list:
    """All events of a streamed request: parsed JSON objects, and "[DONE]" as the string."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", path, json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("content-type").startswith("text/event-stream")
    events = []
    for line in resp:
        if line.strip():
            assert line.startswith(b"data: "), line
            data = line[6:].strip()
            events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    conn.close()
    return events


def metrics(url: str) -> dict[str, float]:
    """GET /metrics parsed: {'name{labels}': value}; also checks every line is well-formed."""
    status, headers, body = request(url, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("#"):
            assert re.match(r"# (HELP|TYPE) sambay_\w+ ", line), line
            continue
        m = re.fullmatch(r'(sambay_\w+(?:\{[^}]*\})?) (-?[\d.e+-]+|\+Inf)', line)
        assert m, f"not Prometheus text: {line!r}"
        out[m[1]] = float(m[2])
    return out


def wait_idle(url: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["sambay_running_requests"] == 0 and m["sambay_queue_depth"] == 0:
            return m
        assert time.monotonic() < deadline, f"still busy: {m}"
        time.sleep(0.02)


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


class Server:
    def __init__(self, folder: Path, log: Path, *args: str):
        self.log = log
        self.proc, self.url = spawn(["--threads", "1", "--model", str(folder), *args], log)

    def stop(self) -> int:
        return stop_server(self.proc)


def assert_openai_error(status: int, body: dict, want_status: int, param=None):
    assert status == want_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param, body


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(folder):
    """The same checkpoint in-process, prepared as the server prepares it."""
    return prepare_for_inference(sambay.load_model(folder)), sambay.load_tokenizer(folder)


def greedy(reference, prompt_ids: list[int], max_tokens: int) -> tuple[str, int, str]:
    """(text, completion tokens, finish_reason) of sambay.runtime.engine.generate on the same ids."""
    model, tok = reference
    out = sambay.generate(model, torch.tensor([prompt_ids]), max_new_tokens=max_tokens,
                          stop_token_ids=STOP_IDS)[0].tolist()
    stopped = bool(out) and out[-1] in STOP_IDS
    return tok.decode(out[:-1] if stopped else out), len(out), "stop" if stopped else "length"


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    s = Server(folder, tmp_path_factory.mktemp("serve") / "server.log", "--served-model-name", "tiny",
               "--max-model-len", "512", "--max-tokens", "400", "--max-request-bytes", "20000",
               "--max-batch-size", "4")
    wait_ready(s.url, proc=s.proc)
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


# ---- generation --------------------------------------------------------------------------------------


def test_completions_greedy_equal_the_engine(server, client, reference):
    tok = reference[1]
    for prompt in PROMPTS[:4]:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
        ids = tok.encode(prompt)
        text, n, finish = greedy(reference, ids, 24)
        assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
        assert len(r.choices) == 1 and r.choices[0].index == 0
        assert r.choices[0].text == text and r.choices[0].finish_reason == finish
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
            (len(ids), n, len(ids) + n)
    # Token ids in, several prompts at once: one choice per prompt, usage over all of them.
    ids = [tok.encode(p) for p in PROMPTS[4:6]]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    want = [greedy(reference, p, 10) for p in ids]
    assert [(c.index, c.text) for c in r.choices] == [(i, w[0]) for i, w in enumerate(want)]
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == sum(w[1] for w in want)


def test_chat_greedy_equals_the_engine_and_stops_at_end_of_turn(server, client, reference):
    tok = reference[1]
    for question, _ in CHATS[:3]:
        messages = [{"role": "user", "content": question}]
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        text, n, finish = greedy(reference, ids, 40)
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == text and r.choices[0].finish_reason == finish
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    # The trained model answers a known question and ends its turn with <|end|>.
    assert finish == "stop" and text == CHATS[2][1]
    # max_completion_tokens wins over max_tokens; a system message and text parts are accepted.
    r = client.chat.completions.create(
        model="tiny", temperature=0, max_tokens=30, max_completion_tokens=3,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hello!"}]}])
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_streaming_chat_and_completions(server, client, reference):
    messages = [{"role": "user", "content": CHATS[0][0]}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0)
    events = sse(server.url, "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 30,
                                                      "temperature": 0, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(chunks) > 3 and text == full.choices[0].message.content
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full.usage.model_dump(exclude_none=True)

    # The openai client's view of a completions stream, without usage.
    pieces, finish = [], None
    for chunk in client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                           stream=True):
        assert chunk.usage is None
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    text, _, want_finish = greedy(reference, reference[1].encode(PROMPTS[0]), 20)
    assert "".join(pieces) == text and finish == want_finish


def test_stop_strings(server, client, reference):
    tok = reference[1]
    text, _, _ = greedy(reference, tok.encode(PROMPTS[1]), 30)
    stop = text[10:14]
    want = text[:text.find(stop)]
    r = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                  stop=["zzzz", stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 30
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=stop, stream=True)]
    assert "".join(pieces) == want


def test_seeded_sampling_and_n(server, client):
    def sample(seed, n=1, prompt=PROMPTS[2]):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=1.0, top_p=0.95,
                                      seed=seed, n=n)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    a = sample(11)
    assert sample(11) == a
    b = sample(12)
    assert b != a  # 24 tokens at temperature 1: another seed gives another text
    assert sample(11, n=2) == a + b  # choice i is sampled with seed + i
    # Chat, n=2, streamed: each choice's deltas carry its index.
    events = sse(server.url, "/v1/chat/completions",
                 {"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "n": 2, "seed": 5,
                  "temperature": 1.0, "max_tokens": 12})
    texts, finished = {0: "", 1: ""}, set()
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
            if c["finish_reason"]:
                finished.add(c["index"])
    assert finished == {0, 1} and events[-1] == "[DONE]"
    for i in (0, 1):
        alone = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello!"}],
                                               seed=5 + i, temperature=1.0, max_tokens=12)
        assert alone.choices[0].message.content == texts[i]


def test_penalties_and_extra_sampling_fields(server, client, reference):
    plain = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=0)
    # top_k 1 is greedy whatever the temperature.
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=1.5,
                                  extra_body={"top_k": 1, "min_p": 0.1})
    assert r.choices[0].text == plain.choices[0].text
    # Penalties only lower the logits of ids already seen (in the prompt or the output), so they can
    # change a greedy text only where it would repeat an id, and a short reply may repeat none. So
    # the penalized requests run on past end-of-turn (ignore_eos) until ids repeat; each must give
    # the engine's own text under the same penalties, and that text must differ from plain greedy.
    model, tok = reference
    engine = Engine(model, tok, max_batch_size=1, max_length=64)
    ids = tok.encode(PROMPTS[0])

    def engine_text(**penalties) -> str:
        out = engine.run([ids], SamplingParams(max_new_tokens=30, stop_token_ids=[], **penalties))[0]
        return tok.decode(out.output_ids)

    unpenalized = engine_text()
    for openai_fields, extra in (({"frequency_penalty": 2.0, "presence_penalty": 2.0}, {"repetition_penalty": 3.0}),
                                 ({}, {"repetition_penalty": 3.0}),
                                 ({"frequency_penalty": 2.0, "presence_penalty": 2.0}, {})):
        want = engine_text(**openai_fields, **extra)
        assert want != unpenalized, (openai_fields, extra)  # else the case could not tell penalties from none
        r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=0,
                                      **openai_fields, extra_body={"ignore_eos": True, **extra})
        assert r.choices[0].text == want, (openai_fields, extra)
    # ignore_eos generates exactly max_tokens even through end-of-turn tokens.
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": CHATS[2][0]}],
                                       max_tokens=25, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 25 and r.choices[0].finish_reason == "length"


def test_logprobs(server, client, reference):
    model, tok = reference
    messages = [{"role": "user", "content": CHATS[1][0]}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for lp in content:
        assert len(lp.top_logprobs) == 3 and lp.logprob <= 0
        assert lp.top_logprobs[0].token == lp.token and lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)
        assert bytes(lp.bytes).decode("utf-8", "replace") == lp.token
    # The first token's log-probability is the model's own.
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), -1)
    assert content[0].logprob == pytest.approx(float(logp.max()), abs=1e-4)
    assert content[0].token == tok.decode([int(logp.argmax())])
    # Not asked, not given.
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=3,
                                          temperature=0).choices[0].logprobs is None
    # Completions: the legacy shape.
    r = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset == sorted(lp.text_offset)
    assert "".join(lp.tokens).startswith(r.choices[0].text)


def test_models_endpoint(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert post(server.url, "/v1/models/tiny", {})[0] == 405
    status, _, body = request(server.url, "GET", "/v1/models/other")
    assert_openai_error(status, json.loads(body), 404, param="model")


# ---- errors ------------------------------------------------------------------------------------------

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}
COMPLETION = {"model": "tiny", "prompt": "The old", "max_tokens": 4}
ERRORS = [  # (name, path, body, status, param)
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None),
    ("not UTF-8", "/v1/completions", b'{"model": "\xff"}', 400, None),
    ("not an object", "/v1/chat/completions", [CHAT], 400, None),
    ("missing field", "/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("unknown field", "/v1/completions", {**COMPLETION, "max_token": 3}, 400, "max_token"),
    ("string for a number", "/v1/completions", {**COMPLETION, "max_tokens": "4"}, 400, "max_tokens"),
    ("float for an integer", "/v1/completions", {**COMPLETION, "n": 1.0}, 400, "n"),
    ("unknown role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role"),
    ("image content", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400,
     "messages.0.content"),
    ("prompt of the wrong shape", "/v1/completions", {**COMPLETION, "prompt": 5}, 400, "prompt"),
    ("wrong model", "/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model"),
    ("empty messages", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("empty prompt", "/v1/completions", {**COMPLETION, "prompt": ""}, 400, "prompt"),
    ("token id out of range", "/v1/completions", {**COMPLETION, "prompt": [1, 2, VOCAB]}, 400, "prompt"),
    ("prompt longer than the context", "/v1/completions", {**COMPLETION, "prompt": "the old mill " * 400}, 400,
     "prompt"),
    ("prompt + max_tokens over the context", "/v1/completions",
     {**COMPLETION, "prompt": "the old mill " * 100, "max_tokens": 400}, 400, "max_tokens"),
    ("max_tokens over the limit", "/v1/chat/completions", {**CHAT, "max_tokens": 401}, 400, "max_tokens"),
    ("max_tokens 0", "/v1/completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens"),
    ("max_completion_tokens negative", "/v1/chat/completions", {**CHAT, "max_completion_tokens": -5}, 400,
     "max_completion_tokens"),
    ("negative temperature", "/v1/chat/completions", {**CHAT, "temperature": -0.5}, 400, "temperature"),
    ("top_p 0", "/v1/completions", {**COMPLETION, "top_p": 0}, 400, "top_p"),
    ("top_p over 1", "/v1/completions", {**COMPLETION, "top_p": 1.5}, 400, "top_p"),
    ("min_p over 1", "/v1/completions", {**COMPLETION, "min_p": 2}, 400, "min_p"),
    ("presence_penalty over 2", "/v1/chat/completions", {**CHAT, "presence_penalty": 3}, 400, "presence_penalty"),
    ("repetition_penalty 0", "/v1/completions", {**COMPLETION, "repetition_penalty": 0}, 400,
     "repetition_penalty"),
    ("n 0", "/v1/completions", {**COMPLETION, "n": 0}, 400, "n"),
    ("top_logprobs over 20", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("empty stop string", "/v1/completions", {**COMPLETION, "stop": ["a", ""]}, 400, "stop"),
    ("stop of the wrong type", "/v1/completions", {**COMPLETION, "stop": 3}, 400, "stop"),
    ("stream_options without stream", "/v1/completions", {**COMPLETION, "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("logit_bias", "/v1/completions", {**COMPLETION, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("oversized body", "/v1/completions", {**COMPLETION, "prompt": "x" * 30000}, 413, None),
]


def test_every_error_has_the_openai_shape_and_the_server_carries_on(server, client):
    ok = 0
    for name, path, body, status, param in ERRORS:
        got_status, _, data = request(server.url, "POST", path, body)
        assert_openai_error(got_status, json.loads(data), status, param)
        # ... and the next request is served normally.
        r = client.completions.create(model="tiny", prompt="The old", max_tokens=2, temperature=0)
        ok += r.choices[0].finish_reason in ("stop", "length")
    assert ok == len(ERRORS)


def test_errors_in_streams_and_odd_transports(server, client):
    # A stream request with a bad field fails before any event, with a JSON error.
    status, body = post(server.url, "/v1/chat/completions", {**CHAT, "stream": True, "temperature": 9})
    assert_openai_error(status, body, 400, "temperature")
    # A body sent in chunks, without Content-Length, is measured as it arrives.
    parts = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    big = json.dumps({**COMPLETION, "prompt": "y" * 40000}).encode()
    conn.request("POST", "/v1/completions", body=iter([big[i:i + 4096] for i in range(0, len(big), 4096)]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    assert_openai_error(resp.status, json.loads(resp.read()), 413)
    conn.close()
    # Any content type is read as JSON (`curl -d` sends form-urlencoded).
    status, body = post(server.url, "/v1/completions", json.dumps(COMPLETION).encode(),
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    # Unknown routes and methods.
    status, _, data = request(server.url, "GET", "/v1/nothing")
    assert_openai_error(status, json.loads(data), 404)
    status, _, data = request(server.url, "GET", "/v1/chat/completions")
    assert_openai_error(status, json.loads(data), 405)
    # The openai client turns these into its exceptions.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT["messages"])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=100000)
    r = client.completions.create(model="tiny", prompt="The", max_tokens=1, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 1


# ---- operations ----------------------------------------------------------------------------------------


def test_metrics_count_requests_and_tokens(server, client):
    before = wait_idle(server.url)
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=9, temperature=0,
                                  extra_body={"ignore_eos": True})
    bad = post(server.url, "/v1/completions", {**COMPLETION, "n": 0})[0]
    after = wait_idle(server.url)

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert bad == 400
    assert delta('sambay_requests_total{endpoint="/v1/completions",status="200"}') == 1
    assert delta('sambay_requests_total{endpoint="/v1/completions",status="400"}') == 1
    assert delta("sambay_prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("sambay_generation_tokens_total") == r.usage.completion_tokens == 9
    assert delta("sambay_time_to_first_token_seconds_count") == 1
    assert after['sambay_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        after["sambay_time_to_first_token_seconds_count"]
    assert after["sambay_model_loaded"] == 1 and after["sambay_generation_tokens_per_second"] > 0
    assert after['sambay_requests_total{endpoint="/metrics",status="200"}'] >= 1


def test_access_log_is_one_json_line_per_request(server, client):
    r = client.completions.create(model="tiny", prompt=PROMPTS[5], max_tokens=5, temperature=0)
    assert request(server.url, "GET", "/no/such/page")[0] == 404

    def ours(line):
        return (line["path"], line["status"], line["prompt_tokens"], line["completion_tokens"]) in {
            ("/v1/completions", 200, r.usage.prompt_tokens, r.usage.completion_tokens),
            ("/no/such/page", 404, None, None)}

    deadline = time.monotonic() + 5
    while True:  # a line is written once its response is sent, so it may lag a little
        lines = [json.loads(x) for x in server.log.read_text().splitlines() if x.startswith("{")]
        hits = [x for x in lines if ours(x)]
        if len({x["path"] for x in hits}) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert [x["path"] for x in hits[-2:]] == ["/v1/completions", "/no/such/page"], lines[-5:]
    assert hits[-2]["method"] == "POST" and hits[-1]["method"] == "GET"
    assert hits[-2]["latency_ms"] > 0 and hits[-2]["client"] == "127.0.0.1" and "time" in hits[-2]


def _start_then_drop(url: str, body: dict, after_events: int, path: str = "/v1/completions",
                     linger: float = 0.0) -> int:
    """Send a request on a raw socket, read `after_events` SSE events (0: none), wait `linger`
    seconds, then hang up. Returns the events seen."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % (path.encode(), len(data)) + data)
    seen = b""
    while seen.count(b"data: ") < after_events:
        chunk = sock.recv(65536)
        assert chunk, seen
        seen += chunk
    time.sleep(linger)
    sock.close()
    return seen.count(b"data: ")


def test_a_client_that_goes_away_frees_its_row(server, client):
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    before = wait_idle(server.url)
    assert _start_then_drop(server.url, {**body, "stream": True}, after_events=3) >= 3
    after = wait_idle(server.url)
    streamed = after["sambay_generation_tokens_total"] - before["sambay_generation_tokens_total"]
    assert 3 <= streamed < 400, streamed  # cancelled well before its 400 tokens
    # A non-streaming request is cancelled too, once it is running.
    parts = urllib.parse.urlsplit(server.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    deadline = time.monotonic() + 10
    while metrics(server.url)["sambay_running_requests"] < 1:
        assert time.monotonic() < deadline
    sock.close()
    final = wait_idle(server.url)
    assert final["sambay_generation_tokens_total"] - after["sambay_generation_tokens_total"] < 400
    # The freed row serves the next request in full (greedy and ignoring EOS, so exactly 2 tokens).
    r = client.completions.create(model="tiny", prompt="The", max_tokens=2, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


@pytest.fixture(scope="module")
def guarded(folder, tmp_path_factory):
    """A server with an API key, one batch row, one queue place, and a slow (2 s) start."""
    s = Server(folder, tmp_path_factory.mktemp("guarded") / "server.log", "--api-key", "sesame",
               "--max-batch-size", "1", "--max-queue", "1", "--max-model-len", "512", "--load-delay", "2")
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


@pytest.mark.slow
def test_health_is_503_until_loaded_and_the_api_key_is_checked(guarded, folder):
    status, _, body = request(guarded.url, "GET", "/health")
    assert (status, json.loads(body)["status"]) == (503, "loading")
    status, body = post(guarded.url, "/v1/completions", {**COMPLETION, "model": folder.name},
                        {"Authorization": "Bearer sesame"})
    assert_openai_error(status, body, 503)
    assert body["error"]["code"] == "model_loading"
    wait_ready(guarded.url, proc=guarded.proc)
    assert request(guarded.url, "GET", "/health")[0] == 200
    assert request(guarded.url, "GET", "/metrics")[0] == 200  # no key needed for operations endpoints
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        status, body = post(guarded.url, "/v1/completions", COMPLETION, headers)
        assert_openai_error(status, body, 401)
        assert body["error"]["type"] == "authentication_error"
    # The key is checked before the body is even read.
    status, body = post(guarded.url, "/v1/completions", b"{not json", {})
    assert status == 401
    bad = openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sesame", max_retries=0)
    assert [m.id for m in good.models.list().data] == [folder.name]  # the folder's name by default
    r = good.completions.create(model=folder.name, prompt="The old", max_tokens=3, temperature=0,
                                extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


@pytest.mark.slow
def test_a_full_queue_answers_429(guarded):
    wait_ready(guarded.url, proc=guarded.proc)
    name = json.loads(request(guarded.url, "GET", "/v1/models", headers={"Authorization": "Bearer sesame"})[2])
    body = {"model": name["data"][0]["id"], "prompt": PROMPTS[0], "max_tokens": 300, "temperature": 0,
            "ignore_eos": True}
    results = [None] * 4

    def call(i):
        status, headers, data = request(guarded.url, "POST", "/v1/completions", body,
                                        {"Authorization": "Bearer sesame"})
        results[i] = status, headers, json.loads(data)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 200, 429, 429], statuses  # one running + one waiting; the rest refused
    for status, headers, data in results:
        if status == 429:
            assert_openai_error(status, data, 429)
            assert data["error"]["code"] == "queue_full" and headers["retry-after"] == "1"
        else:
            assert data["usage"]["completion_tokens"] == 300
    status, _ = post(guarded.url, "/v1/completions", {**body, "max_tokens": 2}, {"Authorization": "Bearer sesame"})
    assert status == 200


@pytest.mark.slow
def test_sigterm_lets_running_streams_finish_within_the_timeout_then_exits_0(folder, tmp_path):
    s = Server(folder, tmp_path / "server.log", "--shutdown-timeout", "3")
    wait_ready(s.url, proc=s.proc)
    parts = urllib.parse.urlsplit(s.url)
    streams = []
    for max_tokens in (100, 4000):  # ~0.5 s: finishes; ~15 s: ended at the timeout
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": folder.name, "prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0,
             "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        streams.append(resp)
    start = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    short, long = ([line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
                   for r in streams)
    assert s.proc.wait(30) == 0
    assert 2.5 < time.monotonic() - start < 15
    assert short[-1] == "[DONE]" and json.loads(short[-2])["usage"]["completion_tokens"] == 100
    assert json.loads(short[-3])["choices"][0]["finish_reason"] == "length"
    assert long[-1] == "[DONE]" and json.loads(long[-2])["error"]["code"] == "shutting_down"
    with pytest.raises(OSError):
        socket.create_connection((parts.hostname, parts.port), timeout=5)
    log = s.log.read_text()
    assert "sambay: stopped" in log and "Traceback" not in log


# ---- the command line ------------------------------------------------------------------------------------


def test_help_shows_every_environment_twin(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for env in ("SAMBAY_MODEL", "SAMBAY_SERVED_MODEL_NAME", "SAMBAY_HOST", "SAMBAY_PORT", "SAMBAY_API_KEY",
                "SAMBAY_DTYPE", "SAMBAY_QUANTIZE", "SAMBAY_THREADS", "SAMBAY_MAX_BATCH_SIZE", "SAMBAY_MAX_QUEUE",
                "SAMBAY_MAX_MODEL_LEN", "SAMBAY_MAX_TOKENS", "SAMBAY_MAX_REQUEST_BYTES",
                "SAMBAY_SHUTDOWN_TIMEOUT", "SAMBAY_NO_ACCESS_LOG"):
        assert f"env {env}" in text, env
    assert "default 127.0.0.1" in text
    monkeypatch.setenv("SAMBAY_PORT", "9123")
    monkeypatch.setenv("SAMBAY_API_KEY", "k")
    monkeypatch.setenv("SAMBAY_NO_ACCESS_LOG", "1")
    args = build_parser().parse_args(["serve"])
    assert (args.port, args.api_key, args.access_log, args.host) == (9123, "k", False, "127.0.0.1")
    assert build_parser().parse_args(["serve", "--port", "7"]).port == 7


def test_sampling_params_mapping():
    info = ModelInfo(tokenizer=None, vocab_size=VOCAB, max_model_len=100, max_tokens=50, stop_ids=[0, 4],
                     defaults={"temperature": 0.6, "top_p": 0.95})
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    p = sampling_params(chat, 30, info)
    assert (p.max_new_tokens, p.temperature, p.top_p, p.stop_token_ids, p.logprobs) == (50, 0.6, 0.95, [0, 4], None)
    assert sampling_params(chat, 80, info).max_new_tokens == 20  # what still fits
    done = CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": 0, "top_k": -1,
                                             "stop": "END", "logprobs": 3, "ignore_eos": True, "seed": 4})
    p = sampling_params(done, 5, info)
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.stop, p.logprobs, p.stop_token_ids, p.seed) == \
        (16, 0.0, 0.95, 0, ["END"], 3, [], 4)


def test_startup_errors_are_one_line(folder, tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sambay: error: no model folder at") and err.count("\n") == 1
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        assert main(["serve"]) == 2
        err = capsys.readouterr().err
        assert "embedded default model is missing" in err and err.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--model", str(folder), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1:" in err and err.count("\n") == 1
    assert main(["serve", "--model", str(folder), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be at least 1" in capsys.readouterr().err


def test_a_model_that_fails_to_load_stops_the_server_with_status_2(folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    proc, url = spawn(["--threads", "1", "--model", str(broken)], tmp_path / "server.log")
    assert proc.wait(60) == 2
    errors = [x for x in (tmp_path / "server.log").read_text().splitlines() if x.startswith("sambay: error:")]
    assert len(errors) == 1 and "model.safetensors" in errors[0], errors
