"""Structured output: response_format json_object / json_schema enforced by a grammar (xgrammar).

In-process, a scripted stand-in model whose logits always prefer one known text shows what the mask
does: the grammar keeps the JSON the script starts and cuts the garbage after it, and a row without
a grammar in the same batch decodes exactly as it would alone. End to end, the embedded default
model (whose text is noise) is served and asked with the official openai client: only the grammar
can make its reply JSON that validates against the schema, and only the grammar of a forced
tool_choice can make its call one with valid arguments; its reasoning fields are checked there too.
"""

import json

import openai
import pytest
import torch

import sambay
from sambay.bench.serve import spawn, wait_ready
from sambay.runtime.engine import Engine, text_stop_ids
from sambay.runtime.load import load_for_inference
from sambay.runtime.sampling import SamplingParams, sample

xgrammar = pytest.importorskip("xgrammar", reason="structured output needs xgrammar (pip install 'sambay[serve]')")

from sambay.serve.protocol import ChatCompletionRequest, ModelInfo, parse_request, sampling_params  # noqa: E402
from sambay.serve.structured import Grammars, keep_from_bitmask, tool_call_grammar  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "rainy": {"type": "boolean"},
    "level": {"type": "string", "enum": ["low", "mid", "high"]},
    "days": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}},
    "required": ["city", "rainy", "level", "days"], "additionalProperties": False}


def validate(doc, schema) -> None:
    """jsonschema's verdict where it is installed, else a check of this file's schemas by hand."""
    try:
        import jsonschema  # optional: the test extra may not have it
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        jsonschema.validate(doc, schema)
        return
    assert isinstance(doc, dict) and set(doc) == set(schema.get("required", doc))
    for key, sub in schema.get("properties", {}).items():
        kind = {"string": str, "boolean": bool, "array": list, "integer": int, "object": dict}[sub["type"]]
        assert isinstance(doc[key], kind), (key, doc[key])
        assert doc[key] in sub.get("enum", [doc[key]])


@pytest.fixture(scope="module")
def tokenizer():
    return sambay.load_tokenizer()


@pytest.fixture(scope="module")
def info(tokenizer):
    model_vocab = 4096
    return ModelInfo(tokenizer, model_vocab, 512, 400, [4, 0], {})


class Scripted(torch.nn.Module):
    """A stand-in model whose next-token logits rank `script`'s next id first, whatever the input, so
    the text it 'wants' to write is known: its k-th generated token (counted from the row's length
    in the state, after `prompt_len` prompt tokens) prefers script[k], then script[k+1], ... The
    real model underneath keeps the state moving as usual, so the engine drives it like any model."""

    def __init__(self, model, script: list[int], prompt_len: int):
        super().__init__()
        self.inner, self.script, self.prompt_len = model, script, prompt_len
        self.config, self.generation_config = model.config, model.generation_config

    def __getattr__(self, name):  # everything else (new_state, ops, ...) is the real model's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, ids, state=None):
        out = self.inner(ids, state=state)
        logits = torch.linspace(0, 1, out.shape[-1]).expand_as(out).clone()  # no ties among the rest
        for b in range(ids.shape[0]):
            k = int(state.lengths[b]) - self.prompt_len
            for rank, tok in enumerate(self.script[k:k + 40]):
                logits[b, -1, tok] = max(float(logits[b, -1, tok]), 100.0 - rank)
        return logits


def test_packed_mask_means_what_the_reference_says(tokenizer, info):
    m = Grammars.of(info).response_format({"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}
                                          ).new_matcher()
    for text in ['', '{"city":"Ro', '{"city":"Rome","rainy":tr']:
        m2 = Grammars.of(info).json_schema(SCHEMA).new_matcher()
        for t in tokenizer.encode(text):
            assert m2.accept(t), (text, t)
        keep = keep_from_bitmask(m2.fill_bitmask(), info.vocab_size)
        row = torch.randn(info.vocab_size)
        masked = row.clone()
        m2.mask_logits(masked)
        assert torch.equal(torch.isfinite(masked), keep)
        assert torch.equal(masked[keep], row[keep])
        assert 0 < int(keep.sum()) < info.vocab_size
    first = keep_from_bitmask(m.fill_bitmask(), info.vocab_size)
    assert first[tokenizer.encode("{")[0]] and not first[tokenizer.encode("x")[0]]


def test_only_the_constrained_row_is_masked(info):
    grammar = Grammars.of(info).json_schema(SCHEMA)
    logits = torch.randn(3, info.vocab_size)
    raw = logits.clone()
    params = [SamplingParams(), SamplingParams(grammar=grammar), SamplingParams()]
    free = sample(logits, [SamplingParams()] * 3)
    ids = sample(logits, params, matchers=[None, grammar.new_matcher(), None])
    assert torch.equal(logits, raw)  # the caller's logits (for logprobs) stay raw
    assert ids[0] == free[0] and ids[2] == free[2]
    assert ids[1] == int(torch.where(keep_from_bitmask(grammar.new_matcher().fill_bitmask(), info.vocab_size),
                                     logits[1], -torch.inf).argmax())


def test_scripted_model_keeps_the_json_and_stops_where_it_ends(tokenizer):
    model, _ = load_for_inference(None)
    wanted = {"city": "Rome", "rainy": True, "level": "mid", "days": [1, 2]}
    text = json.dumps(wanted, separators=(",", ":")) + " and then some garbage that is not JSON"
    script = tokenizer.encode(text)
    stops = text_stop_ids(model, tokenizer)
    info = ModelInfo(tokenizer, model.config.vocab_size, 512, 400, stops, {})
    grammar = Grammars.of(info).json_schema(SCHEMA)
    p = SamplingParams(max_new_tokens=60, stop_token_ids=stops)
    free = Engine(Scripted(model, script, 3), tokenizer, max_length=256).run([[1, 2, 3]], p)[0]
    assert tokenizer.decode(free.output_ids).startswith(text[:40])  # the script is followed
    engine = Engine(Scripted(model, script, 3), tokenizer, max_batch_size=2, max_length=256)
    both = engine.run([[1, 2, 3], [1, 2, 3]], [p.replace(grammar=grammar), p])
    out = both[0].output_ids
    assert both[0].finish_reason == "stop" and out[-1] in stops
    assert json.loads(tokenizer.decode(out[:-1])) == wanted
    assert both[1].output_ids == free.output_ids  # the unconstrained row of the batch is untouched


def test_request_fields_and_errors(info):
    def params(fmt):
        req = parse_request(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                    "response_format": fmt})
        return sampling_params(req, 3, info)

    assert params({"type": "text"}).grammar is None
    assert params({"type": "json_object"}).grammar is not None
    assert params({"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}).grammar
    from sambay.serve.protocol import APIError
    with pytest.raises(APIError, match="json_schema"):
        params({"type": "json_schema"})
    with pytest.raises(APIError, match="schema"):
        params({"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "nonsense"}}})
    with pytest.raises(APIError):
        params({"type": "yaml"})
    tool = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [tool],
            "response_format": {"type": "json_object"}}
    for choice, forced in (("auto", None), ("required", "required"), ({"type": "function", "function": {"name": "f"}}, "f")):
        grammar = sampling_params(parse_request(ChatCompletionRequest, {**body, "tool_choice": choice}), 3, info).grammar
        assert grammar.description == (f"tool call {forced}" if forced else "json_object")  # a forced call wins
    with pytest.raises(APIError, match="schema"):
        sampling_params(parse_request(ChatCompletionRequest, {**body, "tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}), 3, info)


def test_tool_call_grammar_forces_name_and_arguments(tokenizer, info):
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    g = tool_call_grammar(info, "get_weather", parameters)
    good = '{"name":"get_weather","arguments":{"city":"Oslo"}}'
    m = g.new_matcher()
    assert all(m.accept(t) for t in tokenizer.encode(good))
    m = g.new_matcher()
    assert not all(m.accept(t) for t in tokenizer.encode('{"name":"other"'))


# ---- end to end: the default model behind `sambay serve`, the official client ----------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    log = tmp_path_factory.mktemp("structured") / "server.log"
    proc, url = spawn(["--threads", "1", "--max-model-len", "1024", "--max-batch-size", "2"], log)
    try:
        wait_ready(url, proc=proc)
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_default_model_json_schema_with_the_openai_client(client):
    name = client.models.list().data[0].id
    messages = [{"role": "user", "content": "The weather in Rome, as JSON."}]
    plain = client.chat.completions.create(model=name, messages=messages, max_tokens=40, temperature=0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain.choices[0].message.content)  # the tiny model writes noise on its own
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    for seed in (0, 1):
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=300, temperature=1.0,
                                           seed=seed, response_format=fmt)
        assert r.choices[0].finish_reason == "stop", r
        validate(json.loads(r.choices[0].message.content), SCHEMA)
    stream = client.chat.completions.create(model=name, messages=messages, max_tokens=300, temperature=0,
                                            response_format=fmt, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    validate(json.loads(text), SCHEMA)
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=300, temperature=0,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # an object the model keeps writing: still JSON all the way, never anything else
        assert r.choices[0].message.content.startswith("{")
    with pytest.raises(openai.BadRequestError, match="schema"):
        client.chat.completions.create(model=name, messages=messages, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}})


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Rome"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time in a zone", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


@pytest.mark.slow
def test_default_model_tools_with_the_openai_client(client):
    name = client.models.list().data[0].id
    tools = [WEATHER_TOOL, TIME_TOOL]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    messages = [{"role": "user", "content": "What is the weather in Oslo this week?"}]
    r = client.chat.completions.create(model=name, messages=messages, tools=tools, max_tokens=40, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")  # noise, but an answer, never a 500
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, seed in (("required", 0), (named, 1), (named, 2)):
        r = client.chat.completions.create(model=name, messages=messages, tools=tools, tool_choice=choice,
                                           parallel_tool_calls=False, max_tokens=200, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls", r
        (call,) = r.choices[0].message.tool_calls
        assert choice == "required" or call.function.name == "get_weather"
        validate(json.loads(call.function.arguments), schemas[call.function.name])
    stream = client.chat.completions.create(model=name, messages=messages, tools=tools, tool_choice=named,
                                            max_tokens=200, temperature=0, stream=True)
    chunks = list(stream)
    (streamed,) = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    validate(json.loads(streamed.function.arguments), schemas["get_weather"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 18 C all week."}]
    r2 = client.chat.completions.create(model=name, messages=messages, tools=tools, max_tokens=30, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length") and isinstance(r2.choices[0].message.content, str)


@pytest.mark.slow
def test_default_model_reasoning_fields_with_the_openai_client(client):
    """The default model does not think, so its reply is all answer: reasoning_content null, the
    streamed deltas (content only) the same text as the whole reply, no reasoning tokens in usage."""
    name = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=40, temperature=0)
    message = r.choices[0].message
    assert message.content and message.reasoning_content is None
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(getattr(d, "reasoning_content", None) for d in deltas)
    assert "".join(d.content or "" for d in deltas) == message.content
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 0
