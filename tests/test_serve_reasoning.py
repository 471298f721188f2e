"""The reasoning split: the lenient <think>...</think> parser, piece by piece and whole, and the
server's reasoning_content / content, usage and thinking budget, with the official openai client
against a scripted stand-in model whose reply is known."""

import openai
import pytest

import sambay
from sambay.serve.reasoning import CONTENT, REASONING, ReasoningParser, ThinkingBudget, split_reasoning
from scripted import InProcessServer, scripted_model

pytestmark = pytest.mark.usefixtures("one_thread")

# (reply, open_at_start) -> (reasoning_content, content)
CASES = [
    ("<think>\nLet me add 2 and 2.\n</think>\n\nIt is 4.", False, ("Let me add 2 and 2.\n", "It is 4.")),
    ("It is 4.", False, (None, "It is 4.")),  # no thinking at all
    ("Sure. <think>add them</think>4", False, ("add them", "Sure. 4")),  # text before the tag
    ("<think>first add 2 and 2, then", False, ("first add 2 and 2, then", "")),  # cut off inside the thinking
    ("add 2 and 2</think>4", True, ("add 2 and 2", "4")),  # missing opening tag (the prompt opened it)
    ("<think>add</think>4</think> exactly", False, ("add", "4 exactly")),  # several closing tags
    ("<think>a</think>b<think>c</think>d", False, ("ac", "bd")),  # a second stretch of thinking
    ("\n<think>x<think>y</think>z", True, ("xy", "z")),  # an opening tag inside open thinking is dropped
    ("a < b and c </thin k>", False, (None, "a < b and c </thin k>")),  # tag-like text stays text
    ("<think>partial </thi", False, ("partial </thi", "")),  # a half tag at the end is text
]


def parse_pieces(pieces, open_at_start):
    parser = ReasoningParser(open_at_start)
    parts = [p for piece in pieces for p in parser.push(piece)] + parser.flush()
    reasoning = "".join(t for f, t in parts if f == REASONING)
    return (reasoning if parser.saw_reasoning else None), "".join(t for f, t in parts if f == CONTENT)


@pytest.mark.parametrize("text,open_at_start,want", CASES)
def test_lenient_cases_whole_per_character_and_per_token(text, open_at_start, want):
    assert split_reasoning(text, open_at_start) == want
    assert parse_pieces(list(text), open_at_start) == want
    tok = sambay.load_tokenizer()
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in tok.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert parse_pieces(pieces, open_at_start) == want


def test_every_cut_into_two_pieces_gives_the_same_split():
    for text, open_at_start, want in CASES:
        for i in range(len(text) + 1):
            assert parse_pieces([text[:i], text[i:]], open_at_start) == want, (text, i)


class FakeRequest:
    def __init__(self):
        self.forced = []


def test_thinking_budget_counts_and_forces_the_close_once():
    budget = ThinkingBudget([7, 8], budget=3)
    req = FakeRequest()
    for piece in ["Hi ", "<think>", "a", "b", "c", "d"]:
        budget(req, piece)
    assert req.forced == [7, 8]  # at the third thinking token, once
    assert budget.reasoning_tokens == 5
    budget(req, "</think>")
    budget(req, "answer")
    assert budget.reasoning_tokens == 6 and req.forced == [7, 8]
    unlimited = ThinkingBudget([7], budget=None, open_at_start=True)
    for piece in ["x"] * 50:
        unlimited(req, piece)
    assert unlimited.reasoning_tokens == 50 and req.forced == [7, 8]


# ---- the server, with the official openai client ----------------------------------------------------

THINKING = "The user says hello, so I should greet them back politely and briefly."
REPLY = f"<think>\n{THINKING}\n</think>\n\nHello! How can I help?"


@pytest.fixture(scope="module")
def server():
    model, tok = scripted_model(lambda prompt: REPLY)
    srv = InProcessServer(lambda: (model, tok))
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


MESSAGES = [{"role": "user", "content": "Hello!"}]


def test_reasoning_content_and_content(client):
    r = client.chat.completions.create(model="scripted", messages=MESSAGES, temperature=0)
    message = r.choices[0].message
    assert message.reasoning_content == THINKING + "\n"
    assert message.content == "Hello! How can I help?"
    assert r.choices[0].finish_reason == "stop"
    tok = sambay.load_tokenizer()
    reply_tokens = len(tok.encode(REPLY)) + 1  # and <|end|>
    assert r.usage.completion_tokens == reply_tokens
    thinking_tokens = r.usage.completion_tokens_details.reasoning_tokens
    assert 0 < thinking_tokens < reply_tokens - len(tok.encode("Hello! How can I help?"))


def test_streamed_deltas_carry_their_own_field(client):
    chunks = list(client.chat.completions.create(model="scripted", messages=MESSAGES, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [getattr(d, "reasoning_content", None) for d in deltas]
    content = [d.content for d in deltas]
    assert all(not (r and c) for r, c in zip(reasoning, content))  # one field per delta
    assert "".join(r or "" for r in reasoning) == THINKING + "\n"
    assert "".join(c or "" for c in content) == "Hello! How can I help?"
    assert sum(1 for r in reasoning if r) > 3  # streamed as it came, not in one piece
    first_content = next(i for i, c in enumerate(content) if c)
    assert all(not r for r in reasoning[first_content:])
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens > 0


def test_reasoning_format_none_gives_the_raw_text(tmp_path):
    model, tok = scripted_model(lambda prompt: REPLY)
    srv = InProcessServer(lambda: (model, tok), reasoning_format="none")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="scripted", messages=MESSAGES, temperature=0)
        assert r.choices[0].message.content == REPLY
        assert getattr(r.choices[0].message, "reasoning_content", None) is None
        assert r.usage.completion_tokens_details is None
    finally:
        srv.stop()


def test_a_thinking_budget_closes_the_thinking(client):
    tok = sambay.load_tokenizer()
    r = client.chat.completions.create(model="scripted", messages=MESSAGES, temperature=0,
                                       extra_body={"reasoning_budget": 6})
    message = r.choices[0].message
    forced = tok.encode("</think>\n\n")
    assert r.usage.completion_tokens_details.reasoning_tokens <= 6 + len(forced)
    assert message.reasoning_content and THINKING.startswith(message.reasoning_content.strip())
    assert len(message.reasoning_content) < len(THINKING) / 2
    assert message.content  # the model was made to answer (here: the script goes on after the close)
    r0 = client.chat.completions.create(model="scripted", messages=MESSAGES, temperature=0,
                                        extra_body={"reasoning_budget": 0})
    assert r0.choices[0].message.reasoning_content == ""


def test_the_default_max_tokens_is_what_the_context_leaves(client):
    r = client.chat.completions.create(model="scripted", messages=MESSAGES, temperature=0,
                                       extra_body={"reasoning_budget": -1})
    assert r.choices[0].finish_reason == "stop"  # not cut at some fixed default
