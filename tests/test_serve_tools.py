"""Tool calls: tools rendered through the Phi-4 template, <|tool_call|> replies parsed into OpenAI
tool_calls (whole and streamed), a malformed call returned as text, and a second request carrying
the tool's result answered: with the official openai client against a scripted stand-in model."""

import json

import openai
import pytest

import sambay
from sambay.serve.tools import (CALL_OPEN, ToolCallParser, call_schema, forced_call_schema, parse_calls,
                                reply_prefix, template_messages, tool_definitions)
from scripted import InProcessServer, scripted_model

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Rome"]}},
              "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": PARAMETERS}},
         {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                           "parameters": {"type": "object", "properties": {}}}}]
CALL = '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>'
# What the forcing grammar writes (compact JSON): the scripted reply for a forced call that is right.
COMPACT_CALL = '<|tool_call|>[{"name":"get_weather","arguments":{"city":"Paris"}}]<|/tool_call|>'
# A call the grammar of a forced get_weather cannot let through: a city outside the enum, an extra key.
WRONG_CALL = '<|tool_call|>[{"name":"get_weather","arguments":{"city":"Lyon","unit":"C"}}]<|/tool_call|>'


def test_parse_calls_and_the_streaming_parser_agree_piece_by_piece():
    calls = parse_calls('[{"name": "f", "arguments": {"a": 1}}, {"function": {"name": "g", "arguments": "{}"}}]')
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("f", {"a": 1}),
                                                                                                ("g", {})]
    assert parse_calls("[{\"name\": 3}]") is None and parse_calls("not json") is None
    for text, want_calls, want_content in [("Let me check. " + CALL, 1, "Let me check. "),
                                           ("<|tool_call|>{oops}<|/tool_call|>", 0, "<|tool_call|>{oops}<|/tool_call|>"),
                                           ('<|tool_call|>[{"name": "f", "arguments": {}}]', 1, ""),  # no closing tag
                                           ("a <|tool b", 0, "a <|tool b")]:
        for step in (len(text), 1, 3):
            parser = ToolCallParser()
            parts = [p for i in range(0, len(text), step) for p in parser.push(text[i:i + step])] + parser.flush()
            assert len(parser.calls) == want_calls, (text, step)
            assert "".join(v for k, v in parts if k == "content") == want_content, (text, step)


def test_tools_go_into_the_system_message_of_the_template():
    tok = sambay.load_tokenizer()
    defs = tool_definitions(TOOLS, "auto")
    text = tok.apply_chat_template(template_messages([{"role": "user", "content": "Hi"}], defs))
    assert text.startswith("<|system|>") and f"<|tool|>{defs}<|/tool|><|end|><|user|>Hi<|end|><|assistant|>" in text
    assert tool_definitions(TOOLS, "none") is None
    history = template_messages([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18 C"}], None)
    assert history[0]["content"] == CALL and history[1] == {"role": "tool_response", "content": "18 C"}


def reply_for(prompt: str) -> str:
    if "<|tool_response|>" in prompt:
        return "It is 18 C in Paris."
    if "please fail" in prompt:
        return "<|tool_call|>[{broken<|/tool_call|>"
    if "compact" in prompt:
        return COMPACT_CALL
    if "wrong" in prompt:
        return WRONG_CALL
    return CALL


@pytest.fixture(scope="module")
def client():
    model, tok = scripted_model(reply_for)
    srv = InProcessServer(lambda: (model, tok))
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    srv.stop()


def test_a_tool_call_then_its_result_gets_an_answer(client):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
    r2 = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, temperature=0)
    assert r2.choices[0].message.content == "It is 18 C in Paris." and r2.choices[0].finish_reason == "stop"


def test_streamed_tool_call_deltas(client):
    chunks = list(client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Paris?"}],
                                                 tools=TOOLS, tool_choice="auto", temperature=0, stream=True))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [(0, "get_weather", {"city": "Paris"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_a_malformed_call_is_text_and_a_named_choice_must_exist(client):
    r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "please fail"}],
                                       tools=TOOLS, temperature=0)
    assert r.choices[0].message.content == "<|tool_call|>[{broken<|/tool_call|>"
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    with pytest.raises(openai.BadRequestError, match="not among"):
        client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "x"}], tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_a_forced_call_follows_the_script_when_it_is_valid_and_is_answered(client):
    messages = [{"role": "user", "content": "compact: weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, tool_choice=choice,
                                           temperature=0)
        assert r.choices[0].finish_reason == "tool_calls", (choice, r)
        (call,) = r.choices[0].message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    history = messages + [r.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
    r2 = client.chat.completions.create(model="scripted", messages=history, tools=TOOLS, temperature=0)
    assert r2.choices[0].message.content == "It is 18 C in Paris."


def test_a_forced_call_constrains_the_arguments_to_the_parameters(client):
    messages = [{"role": "user", "content": "wrong: weather?"}]
    free = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, temperature=0)
    (call,) = free.choices[0].message.tool_calls  # unforced, the script's call goes out as written
    assert json.loads(call.function.arguments) == {"city": "Lyon", "unit": "C"}
    named = {"type": "function", "function": {"name": "get_weather"}}
    for stream in (False, True):
        r = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, tool_choice=named,
                                           temperature=0, stream=stream)
        if stream:
            chunks = list(r)
            calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
            finish = chunks[-1].choices[0].finish_reason
        else:
            calls, finish = r.choices[0].message.tool_calls, r.choices[0].finish_reason
        assert finish == "tool_calls" and len(calls) == 1
        assert calls[0].function.name == "get_weather"
        args = json.loads(calls[0].function.arguments)
        assert set(args) == {"city"} and args["city"] in PARAMETERS["properties"]["city"]["enum"], args
    r = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        assert json.loads(call.function.arguments)["city"] in PARAMETERS["properties"]["city"]["enum"]


def test_forced_call_schema():
    named = forced_call_schema(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    assert named == {"type": "array", "items": call_schema("get_time", {"type": "object", "properties": {}}),
                     "minItems": 1, "maxItems": 1}
    required = forced_call_schema(TOOLS, "required")
    assert [c["properties"]["name"] for c in required["items"]["anyOf"]] == [{"const": "get_weather"},
                                                                          {"const": "get_time"}]
    assert "maxItems" not in required and forced_call_schema(TOOLS, "required", parallel=False)["maxItems"] == 1
    assert forced_call_schema(TOOLS, "auto") is None and forced_call_schema([], "required") is None
    assert reply_prefix("required") == reply_prefix({"type": "function", "function": {"name": "f"}}) == CALL_OPEN
    assert reply_prefix("auto") == ""
