"""The prefix-state cache (sambay.runtime.prefix_cache) and the engine's pieces built on row state
copies: restored prefixes give a fresh prefill's logits (both families, across the sliding window
and chunk boundaries), snapshots stay with their model, the LRU keeps to its budget, chunked
prefills (begin_request / prefill) and forks (shared prefills) decode as before."""

import pytest
import torch

import sambay
from sambay.models import preset
from sambay.runtime.engine import Engine
from sambay.runtime.generate import generate
from sambay.runtime.prefix_cache import PrefixCache, model_identity
from sambay.runtime.sampling import SamplingParams

from conftest import GOLDEN  # noqa: E402 - the shared path

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK = 16  # tests' prefill chunk (and so snapshot block); the models' sliding windows are 8 (tiny) or 128
A = [(7 * i + 3) % 500 for i in range(70)]
B = A[:50] + [(11 * i + 1) % 500 for i in range(40)]  # shares 50 tokens with A: a block hit at 48


@pytest.fixture(scope="module", params=["golden", "tiny", "tiny-phi3"])
def model(request):
    if request.param == "golden":
        return sambay.load_model(GOLDEN, dtype=torch.float32)
    return sambay.build_model(preset(request.param), seed=3)


def engine(model, mb=64, **kw):
    return Engine(model, max_batch_size=kw.pop("rows", 2), max_length=kw.pop("max_length", 256),
                  prefill_chunk=CHUNK, prefix_cache_mb=mb, **kw)


def fresh_logits(model, prompt):
    return engine(model, mb=0, rows=1).add_request(prompt, SamplingParams(max_new_tokens=1)).logits


def greedy(n):
    return SamplingParams(max_new_tokens=n, stop_token_ids=[])


def test_block_hit_gives_a_fresh_prefills_logits_exactly(model):
    e = engine(model)
    e.add_request(A, greedy(1))
    e.reset()
    r = e.add_request(B, greedy(1))
    assert r.stats.cached_tokens == 48  # the last block boundary within the shared 50 tokens
    assert e.prefix_cache.hits == 1 and e.prefix_cache.misses == 1
    # Restoring at a chunk boundary continues with the very chunks a fresh prefill runs.
    assert torch.equal(r.logits, fresh_logits(model, B))


def test_hit_off_a_chunk_boundary_matches_and_decodes_the_same(model):
    e = engine(model)
    e.add_request(A, greedy(1))
    e.reset()
    prompt = A + [9, 8, 7]  # restores A's end (70 tokens, inside a chunk), prefills 3
    r = e.add_request(prompt, greedy(1))
    assert r.stats.cached_tokens == len(A)
    torch.testing.assert_close(r.logits, fresh_logits(model, prompt), rtol=1e-5, atol=1e-5)
    e.reset()
    cached = e.run([prompt], greedy(12))[0].output_ids
    assert cached == engine(model, mb=0).run([prompt], greedy(12))[0].output_ids


def test_identical_prompt_needs_no_prefill(model):
    e = engine(model)
    first = e.add_request(A, greedy(1)).logits.clone()
    e.reset()
    again = e.add_request(A, greedy(1))
    assert again.stats.cached_tokens == len(A)
    assert torch.equal(again.logits, first)


def test_next_chat_turn_restores_prompt_and_reply(model):
    e = engine(model)
    first = e.run([A], greedy(10))[0]
    fed = A + first.output_ids[:-1]  # a finished request's last token is never fed
    turn2 = fed + [first.output_ids[-1], 5, 6, 7]
    r = e.add_request(turn2, greedy(1))
    assert r.stats.cached_tokens == len(fed)
    torch.testing.assert_close(r.logits, fresh_logits(model, turn2), rtol=1e-5, atol=1e-5)


def test_snapshots_never_leak_between_models():
    one = sambay.build_model(preset("tiny"), seed=1)
    two = sambay.build_model(preset("tiny"), seed=2)  # same shapes, same config, other weights
    assert model_identity(one) != model_identity(two)
    e1, e2 = engine(one), engine(two)
    e2.prefix_cache = e1.prefix_cache  # one cache shared by two engines
    e1.add_request(A, greedy(1))
    r = e2.add_request(A, greedy(1))
    assert r.stats.cached_tokens == 0
    assert torch.equal(r.logits, fresh_logits(two, A))
    bf16 = sambay.build_model(preset("tiny"), seed=1).to(torch.bfloat16)
    assert model_identity(bf16)[3] != model_identity(one)[3]


def test_lru_stays_under_its_budget(model):
    e = engine(model)
    e.add_request(A, greedy(1))
    per_entry = e.prefix_cache.nbytes / len(e.prefix_cache)
    small = PrefixCache(int(per_entry * 3), block=CHUNK)
    e = engine(model)
    e.prefix_cache = small
    for k in range(4):
        e.add_request([k + 1] + A, greedy(1))
        e.reset()
        assert 0 < small.nbytes <= small.budget
    assert small.counters()["entries"] < 4 * 5  # evicted
    r = e.add_request([4] + A, greedy(1))  # the most recent prompt is still there
    assert r.stats.cached_tokens == len(A) + 1


def test_cache_restores_into_a_grown_state(model):
    e = Engine(model, prefill_chunk=CHUNK)  # sized on demand: the state grows between requests
    e.run([A], greedy(4))
    long = A + list(range(1, 300))
    r = e.add_request(long, greedy(1))
    assert e.state.max_length > 256 and r.stats.cached_tokens > 0
    torch.testing.assert_close(r.logits, fresh_logits_long(model, long), rtol=1e-5, atol=1e-5)


def fresh_logits_long(model, prompt):
    return Engine(model, prefill_chunk=CHUNK, prefix_cache_mb=0).add_request(prompt, greedy(1)).logits


def test_left_padded_batch_through_generate_equals_the_rows_alone(model):
    prompts = [A[:30], A]
    ids = torch.zeros(2, len(A), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, -len(p):], mask[i, -len(p):] = torch.tensor(p), 1
    out = generate(model, ids, attention_mask=mask, max_new_tokens=6, stop_token_ids=[])
    for i, p in enumerate(prompts):
        assert out[i].tolist() == engine(model, mb=0).run([p], greedy(6))[0].output_ids


def test_prefill_in_pieces_between_decode_steps(model):
    e = engine(model, mb=0, rows=2)
    running = e.add_request(B, greedy(20))
    begun = e.begin_request(A, greedy(8))
    assert e.free_slots == 0 and not e.pending[0].prefill.done
    steps = 0
    while not e.prefill(begun, 5):  # 5 tokens per step, across chunk boundaries
        e.step()
        steps += 1
    assert steps == len(A) // 5 - (len(A) % 5 == 0)
    while e.num_active:
        e.step()
    assert begun.output_ids == engine(model, mb=0).run([A], greedy(8))[0].output_ids
    assert running.output_ids == engine(model, mb=0).run([B], greedy(20))[0].output_ids


def test_cancel_a_begun_request(model):
    e = engine(model, rows=1)
    r = e.begin_request(A, greedy(4))
    assert e.cancel(r) and r.finish_reason == "cancelled" and e.free_slots == 1


@pytest.mark.parametrize("mb", [0, 64])
def test_fork_decodes_like_a_separate_request_with_the_same_seed(model, mb):
    params = [SamplingParams(max_new_tokens=10, temperature=0.9, seed=s, stop_token_ids=[]) for s in (1, 2, 3)]
    e = engine(model, mb=mb, rows=3)
    src = e.add_request(A, params[0])
    forks = [e.fork(src, p) for p in params[1:]]
    assert all(f.stats.cached_tokens == len(A) for f in forks)
    while e.num_active:
        e.step()
    for req, p in zip([src] + forks, params):
        assert req.output_ids == engine(model, mb=0).run([A], p)[0].output_ids
