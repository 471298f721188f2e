"""Generation: the golden greedy tokens, batching, the request-level engine, sampling and text."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sambay
from sambay.runtime import sampling
from sambay.runtime.engine import Engine
from sambay.runtime.generate import generate, stream
from sambay.runtime.text import StopStrings
from sambay.runtime.sampling import (SamplingParams, TokenCounts, apply_penalties, filter_mask, filter_mask_ref,
                             sample)

from conftest import GOLDEN  # noqa: E402 - the shared path
PROMPTS = [[5, 17, 200], list(range(40, 51)), [(7 * i + 3) % 500 for i in range(21)]]  # lengths 3, 11, 21


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return sambay.load_model(GOLDEN, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer():
    from sambay.tokenizer import train_bpe_tokenizer

    texts = ["The quick brown fox jumps over the lazy dog. Hello world!",
             "Pack my box with five dozen liquor jugs; ünïcödé ✓ 日本語 (0123456789)"] * 4
    return train_bpe_tokenizer(texts, vocab_size=400)


def alone(model, prompt, n, **kw):
    return generate(model, torch.tensor([prompt]), max_new_tokens=n, stop_token_ids=[], **kw)[0].tolist()


# ---- the reference's greedy generations ------------------------------------------------------


@pytest.mark.parametrize("case, key", [("golden", "greedy_tokens"), ("golden_leftpad", "greedy_tokens"),
                                       ("quirk_short_prefill", "greedy_tokens_consistent")])
def test_greedy_matches_golden(model, case, key):
    g = load_file(GOLDEN / f"{case}.safetensors")
    want = g[key]
    out = generate(model, g["prompt_ids"], attention_mask=g.get("prompt_attention_mask"),
                   max_new_tokens=want.shape[1])
    assert out.dtype == torch.long
    assert torch.equal(out, want), f"{case}: {out.tolist()} != {want.tolist()}"


def test_chunked_prefill_gives_the_same_tokens(model):
    prompt = PROMPTS[2]
    whole = Engine(model, max_batch_size=1, max_length=40).run([prompt], SamplingParams(max_new_tokens=8))
    chunked = Engine(model, max_batch_size=1, max_length=40, prefill_chunk=4).run(
        [prompt], SamplingParams(max_new_tokens=8))
    assert whole[0].output_ids == chunked[0].output_ids


# ---- batching ------------------------------------------------------------------------------------


def test_mixed_lengths_batch_equals_each_prompt_alone(model):
    n = 12
    singles = [alone(model, p, n) for p in PROMPTS]
    T = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[511] * (T - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    batch = generate(model, ids, attention_mask=mask, max_new_tokens=n, stop_token_ids=[])
    assert batch.tolist() == singles
    # Requests finishing at different steps: the rows left keep their tokens, and a finished row
    # leaves the batch (decode calls shrink 3 -> 2 -> 1; a request's last token is never fed).
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    try:
        reqs = Engine(model, max_batch_size=3).run(
            PROMPTS, [SamplingParams(max_new_tokens=k, stop_token_ids=[]) for k in (4, 12, 7)])
    finally:
        hook.remove()
    assert [r.output_ids for r in reqs] == [singles[0][:4], singles[1], singles[2][:7]]
    assert [r.finish_reason for r in reqs] == ["length"] * 3
    assert calls[:3] == [(1, 3), (1, 11), (1, 21)]  # each prompt prefilled alone, unpadded
    assert [b for b, _ in calls[3:]] == [3] * 3 + [2] * 3 + [1] * 5


def test_stop_ids_end_rows_and_pad(model):
    free = alone(model, PROMPTS[1], 12)
    k = next(i for i in range(3, 12) if free[i] not in free[:i])  # first occurrence at i >= 3
    stop = free[k]
    other = PROMPTS[1][:-1] + [PROMPTS[1][-1] + 1]
    out = generate(model, torch.tensor([PROMPTS[1], other]), max_new_tokens=12, stop_token_ids=[stop])
    assert out[0].tolist() == free[:k + 1] + [511] * (out.shape[1] - k - 1)  # stop id kept, then pad
    row1 = generate(model, torch.tensor([other]), max_new_tokens=12, stop_token_ids=[stop])[0].tolist()
    assert out[1].tolist() == row1 + [511] * (out.shape[1] - len(row1))
    # Default stop ids are the model's eos (511 here); a request finishing on one says "stop".
    eng = Engine(model)
    req = eng.add_request(PROMPTS[1], SamplingParams(max_new_tokens=12, stop_token_ids=[stop]))
    events = []
    while eng.num_active:
        events += eng.step()
    assert [e.token_id for e in events] == free[:k + 1]
    assert events[-1].finished and events[-1].finish_reason == "stop" and not events[-2].finished
    assert eng.stop_ids == [511]


# ---- the request-level engine ------------------------------------------------------------------


def test_requests_added_midway_match_running_alone(model):
    n = 10
    singles = [alone(model, p, n) for p in PROMPTS]
    eng = Engine(model, max_batch_size=3, max_length=64)
    got = {i: [] for i in range(3)}
    params = SamplingParams(max_new_tokens=n, stop_token_ids=[])
    eng.add_request(PROMPTS[0], params, request_id=0)
    for step in range(40):
        if step == 3:
            eng.add_request(PROMPTS[1], params, request_id=1)
        if step == 6:
            eng.add_request(PROMPTS[2], params, request_id=2)
        for ev in eng.step():
            got[ev.request_id].append(ev.token_id)
        if not eng.num_active:
            break
    assert [got[i] for i in range(3)] == singles


def test_cancel_frees_the_slot(model):
    eng = Engine(model, max_batch_size=2, max_length=64)
    params = SamplingParams(max_new_tokens=6, stop_token_ids=[])
    a = eng.add_request(PROMPTS[0], params)
    b = eng.add_request(PROMPTS[1], params)
    eng.step()
    with pytest.raises(sambay.SambayError, match="engine is full"):
        eng.add_request(PROMPTS[2], params)
    assert eng.cancel(a) and not eng.cancel(a)
    assert a.finish_reason == "cancelled" and eng.free_slots == 1 and b.slot == 0
    c = eng.add_request(PROMPTS[2], params)  # takes the freed row
    while eng.num_active:
        eng.step()
    assert b.output_ids == alone(model, PROMPTS[1], 6)
    assert c.output_ids == alone(model, PROMPTS[2], 6)


def test_logprobs_and_stats(model):
    eng = Engine(model)
    req = eng.add_request(PROMPTS[2], SamplingParams(max_new_tokens=3, logprobs=2))
    logits = req.logits.clone()
    ev = eng.step()[0]
    logp = torch.log_softmax(logits, -1)
    assert ev.token_id == int(logits.argmax())
    assert math.isclose(ev.logprob, float(logp.max()), abs_tol=1e-5)
    assert [i for i, _ in ev.top_logprobs] == logp.topk(2).indices.tolist()
    while eng.num_active:
        eng.step()
    s = req.stats
    assert (s.prompt_tokens, s.generated_tokens) == (21, 3)
    assert s.prefill_seconds > 0 and s.decode_tokens_per_second > 0
    assert s.summary().startswith("prompt 21 tok | generated 3 tok | prefill ")


def test_user_errors_are_one_line(model):
    cases = [
        (dict(max_new_tokens=5000), "exceeds the model's context of 4096"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_k=-2), "top_k must be"),
        (dict(min_p=2.0), "min_p must be"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(nucleus=0.5), "unknown sampling option"),
        (dict(stop=["x"]), "stop strings need a tokenizer"),
    ]
    for kw, msg in cases:
        with pytest.raises(sambay.SambayError, match=msg) as e:
            generate(model, torch.tensor([PROMPTS[0]]), **{"max_new_tokens": 4, **kw})
        assert "\n" not in str(e.value)
    with pytest.raises(sambay.SambayError, match="prompt is empty"):
        Engine(model).add_request([], SamplingParams(max_new_tokens=2))
    with pytest.raises(sambay.SambayError, match="holds 16 per request"):
        Engine(model, max_length=16).add_request(PROMPTS[2], SamplingParams(max_new_tokens=2))


# ---- sampling ------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(model):
    ids = torch.tensor([PROMPTS[1]])
    kw = dict(max_new_tokens=12, temperature=1.0, stop_token_ids=[])
    a, b = generate(model, ids, seed=1, **kw), generate(model, ids, seed=1, **kw)
    c = generate(model, ids, seed=2, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, generate(model, ids, **kw))  # greedy differs from sampled
    # A row's draws depend on its own seed only, not on its batch mates (row b uses seed + b).
    batch = generate(model, torch.tensor([PROMPTS[1], PROMPTS[1]]), seed=1, **kw)
    assert torch.equal(batch[0], a[0]) and torch.equal(batch[1], c[0])


def test_filters_match_the_reference():
    g = torch.Generator().manual_seed(0)
    settings = [(0, 1.0, 0.0), (1, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.9, 0.0), (0, 0.3, 0.0), (0, 1.0, 0.2),
                (8, 0.7, 0.05), (3, 0.5, 0.5), (0, 1e-6, 0.0), (50, 1.0, 1.0)]
    logits = torch.randn(len(settings), 50, generator=g) * 2
    logits[0, 7] = logits[0, 9]  # a tie
    keep = filter_mask(logits, torch.tensor([s[0] for s in settings]),
                       torch.tensor([s[1] for s in settings]), torch.tensor([s[2] for s in settings]))
    for row, (k, p, m) in enumerate(settings):
        assert torch.equal(keep[row], filter_mask_ref(logits[row], k, p, m)), (k, p, m)


@pytest.mark.parametrize("candidates", [4, 16, 1024])
def test_filters_over_the_largest_logits_match_the_reference(candidates, monkeypatch):
    """Top-k / top-p sort only the largest logits when those decide a row, else the whole row:
    both ways give the reference's sets, ties at the candidates' edge included."""
    monkeypatch.setattr(sampling, "CANDIDATES", candidates)
    g = torch.Generator().manual_seed(1)
    settings = [(0, 0.3, 0.0), (0, 0.9, 0.0), (0, 0.999, 0.0), (3, 1.0, 0.0), (20, 1.0, 0.0), (20, 0.5, 0.0),
                (2, 0.99, 0.0), (0, 0.5, 0.1), (200, 0.8, 0.0), (0, 1e-6, 0.0)]
    logits = torch.randn(len(settings), 200, generator=g) * 3
    logits[:, 100:110] = logits[:, :200].max(dim=1, keepdim=True).values - 1  # a block of ties near the top
    logits[1, 5] = logits[1, 7] = logits[1].max() + 1  # a tie for first place
    keep = filter_mask(logits, torch.tensor([s[0] for s in settings]),
                       torch.tensor([s[1] for s in settings]), torch.tensor([s[2] for s in settings]))
    for row, (k, p, m) in enumerate(settings):
        assert torch.equal(keep[row], filter_mask_ref(logits[row], k, p, m)), (candidates, k, p, m)


def test_each_filter_does_what_it_says():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().unsqueeze(0)

    def kept(top_k=0, top_p=1.0, min_p=0.0):
        mask = filter_mask(logits, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))[0]
        return set(torch.nonzero(mask).flatten().tolist())

    assert kept() == {0, 1, 2, 3}
    assert kept(top_k=2) == {1, 3}
    assert kept(top_p=0.4) == {1}  # the top id alone already reaches 0.4
    assert kept(top_p=0.75) == {1, 3}  # 0.5 + 0.3 reaches 0.75
    assert kept(top_p=0.85) == {1, 3, 2}
    assert kept(min_p=0.5) == {1, 3}  # at least 0.25
    assert kept(min_p=0.2) == {1, 3, 2}  # at least 0.1
    assert kept(top_k=3, top_p=0.6) == {1, 3}  # top-p after top-k renormalizes 0.5 / 0.95


def test_sample_draws_from_the_filtered_distribution():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    gen = [torch.Generator().manual_seed(i) for i in range(4000)]
    free = sample(logits, [SamplingParams(temperature=1.0)] * 4000, gen)
    freq = torch.bincount(free, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03), freq
    top2 = sample(logits, [SamplingParams(temperature=1.0, top_k=2)] * 4000, gen)
    assert set(top2.tolist()) == {1, 3}
    assert abs(float((top2 == 1).float().mean()) - 0.5 / 0.8) < 0.03
    cold = sample(logits, [SamplingParams(temperature=0.05)] * 4000, gen)
    assert float((cold == 1).float().mean()) > 0.99
    hot = sample(logits, [SamplingParams(temperature=5.0)] * 4000, gen)
    assert float((hot == 0).float().mean()) > 0.15  # flatter than 0.05
    assert sample(logits[:2], [SamplingParams(), SamplingParams(top_k=1, temperature=3.0)]).tolist() == [1, 1]


def test_penalties():
    logits = torch.tensor([2.0, 1.0, -1.0, 0.5])
    counts = TokenCounts(4, prompt_ids=[2])
    counts.add(0)
    counts.add(0)
    rep = apply_penalties(logits, SamplingParams(repetition_penalty=4.0), counts)
    assert rep.tolist() == [0.5, 1.0, -4.0, 0.5]  # HF: divide positive, multiply negative, prompt too
    pf = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), counts)
    assert pf.tolist() == [2.0 - 0.5 - 0.5, 1.0, -1.0, 0.5]  # OpenAI: generated ids only
    params = [SamplingParams(), SamplingParams(repetition_penalty=4.0)]
    ids = sample(torch.stack([logits, logits]), params, counts=[None, counts])
    assert ids.tolist() == [0, 1]
    with pytest.raises(ValueError, match="TokenCounts"):
        sample(logits.unsqueeze(0), params[1:])


# ---- text ------------------------------------------------------------------------------------------


def test_stop_strings_hold_back_partial_matches():
    s = StopStrings(["world", "xy"])
    assert s.push("Hello wo") == "Hello "  # "wo" could start "world"
    assert s.push("r") == ""
    assert s.push("ld! more") == "" and s.stopped
    assert s.flush() == ""
    s = StopStrings(["world"])
    assert s.push("Hello wo") == "Hello " and s.push("nder") == "wonder" and s.push("wor") == ""
    assert s.flush() == "wor"  # the end came before the stop string did


def test_streamed_text_and_stop_strings(model, tokenizer):
    prompt = tokenizer.encode("The quick brown fox")
    full = stream(model, tokenizer, prompt, max_new_tokens=24)
    pieces = list(full)
    assert "".join(pieces) == full.text
    ids = full.token_ids
    stop_ids = {511, *tokenizer.eos_token_ids}
    shown = ids[:-1] if ids[-1] in stop_ids else ids
    assert full.text == tokenizer.decode(shown) and len(full.text) >= 6
    assert full.finish_reason in ("stop", "length")
    # Stop at a string from the middle of that text: nothing from the stop string on is shown.
    cut = len(full.text) // 2
    stop = full.text[cut:cut + 3]
    first = full.text.find(stop)
    engine = Engine(model, tokenizer)
    cut_stream = engine.stream_text(prompt, SamplingParams(max_new_tokens=24, stop=[stop, "\x00never"]))
    pieces = list(cut_stream)
    assert "".join(pieces) == full.text[:first] == cut_stream.text
    assert cut_stream.finish_reason == "stop" and engine.num_active == 0
    assert len(cut_stream.token_ids) <= len(ids)
    # A stop id ends the text without showing the stop token.
    stop_id = ids[2]
    by_id = engine.stream_text(prompt, SamplingParams(max_new_tokens=24, stop_token_ids=[stop_id])).read()
    assert by_id == tokenizer.decode(ids[:ids.index(stop_id)])
    # Leaving the loop early cancels the request and frees the engine.
    early = engine.stream_text(prompt, SamplingParams(max_new_tokens=24))
    for _ in early:
        break
    early.close()
    assert engine.num_active == 0 and early.finish_reason == "cancelled"
