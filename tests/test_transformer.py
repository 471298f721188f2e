"""The Phi3 Transformer baseline against Hugging Face transformers' Phi3ForCausalLM (test-only
dependency): same logits, same greedy generation, same files; and sambay's own invariants
(cached decode = full forward, int8, save/load, info, train) for the new family."""

import json

import pytest
import torch

import sambay
from sambay.cli import main
from sambay.models import Phi3Config, load_config, preset
from sambay.kernels import prepare_for_inference

transformers = pytest.importorskip("transformers")

LONGROPE = {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(6)],
            "long_factor": [2.0 + 0.3 * i for i in range(6)]}
VARIANTS = {
    "tied": {},
    "untied": {"tie_word_embeddings": False},
    "full-rotary": {"partial_rotary_factor": 1.0},
    "window-5": {"sliding_window": 5},
    "mha": {"num_key_value_heads": 4},
    # Positions past original_max (8) switch RoPE to the long factors, as in transformers.
    "longrope": {"rope_scaling": LONGROPE, "original_max_position_embeddings": 8,
                 "max_position_embeddings": 64},
}


def random_model(seed=0, **changes):
    model = sambay.build_model(preset("tiny-phi3").replace(**changes), seed=seed)
    with torch.no_grad():  # larger-than-init weights so every layer visibly matters
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


def reference(model, folder):
    """transformers' model from the folder sambay wrote (also checks the file format)."""
    sambay.save_model(model, folder)
    hf = transformers.Phi3ForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                      attn_implementation="eager")
    hf.generation_config.eos_token_id = None  # run every requested step, as stop_token_ids=[] does
    hf.generation_config.pad_token_id = model.config.pad_token_id
    return hf.eval()


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_transformers(variant, tmp_path):
    model = random_model(**VARIANTS[variant])
    hf = reference(model, tmp_path)
    ids = torch.randint(0, 511, (2, 20), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["tied", "window-5", "longrope"])
def test_greedy_generation_equals_transformers(variant, tmp_path):
    model = random_model(**VARIANTS[variant])
    hf = reference(model, tmp_path)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 511, (1, 7), generator=g)
    want = hf.generate(ids, max_new_tokens=24, do_sample=False)[:, 7:]
    got = sambay.generate(model, ids, max_new_tokens=24, stop_token_ids=[])
    assert torch.equal(got, want)


@torch.no_grad()
def test_longrope_prompt_past_the_switch_equals_transformers_whatever_the_prefill_chunk(tmp_path):
    """A 14-token prompt past LongRoPE's switch at 8: transformers rotates every prompt key with the
    long factors in its one prefill call; the engine must not chunk such a prompt."""
    model = random_model(**VARIANTS["longrope"])
    hf = reference(model, tmp_path)
    ids = torch.randint(0, 511, (1, 14), generator=torch.Generator().manual_seed(7))
    want = hf.generate(ids, max_new_tokens=10, do_sample=False)[0, 14:].tolist()
    engine = sambay.Engine(model, max_length=24, prefill_chunk=4)
    req = engine.add_request(ids[0], sambay.SamplingParams(max_new_tokens=10, stop_token_ids=[]))
    while engine.num_active:
        engine.step()
    assert req.output_ids == want


@torch.no_grad()
def test_ragged_batch_generation_equals_transformers_left_padded(tmp_path):
    model = random_model()
    hf = reference(model, tmp_path)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 511, (9,), generator=g), torch.randint(0, 511, (4,), generator=g)
    ids = torch.full((2, 9), model.config.pad_token_id)
    ids[0], ids[1, 5:] = a, b
    mask = (torch.arange(9) >= torch.tensor([[0], [5]])).long()
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[:, 9:]
    got = sambay.generate(model, ids, attention_mask=mask, max_new_tokens=12, stop_token_ids=[])
    assert torch.equal(got, want)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["tied", "window-5", "longrope"])
def test_cached_decode_equals_full_forward(variant):
    model = random_model(**VARIANTS[variant])
    ids = torch.randint(0, 511, (2, 24), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    for prefill in (1, 6, 12):  # below and above the window of 5 and LongRoPE's switch at 8
        state = model.new_state(2, 24)
        got = [model(ids[:, :prefill], state=state, logits_to_keep=0)]
        got += [model(ids[:, t:t + 1], state=state) for t in range(prefill, 24)]
        if variant == "longrope" and prefill < 8:
            continue  # transformers re-rotates nothing either: keys cached before the switch differ
        torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("tied", [True, False])
def test_int8_and_save_load_round_trip(tied, tmp_path):
    model = random_model(tie_word_embeddings=tied)
    ids = torch.randint(0, 511, (1, 16), generator=torch.Generator().manual_seed(6))
    want = model(ids)
    sambay.save_model(model, tmp_path / "fp")
    again = sambay.load_model(tmp_path / "fp")
    assert torch.equal(again(ids), want)
    assert ("lm_head.weight" in again.state_dict()) == (not tied)
    q = prepare_for_inference(sambay.load_model(tmp_path / "fp"), "int8")
    # The stated int8 tolerance of tests/test_quant.py: within 5% relative on a tiny random model.
    rel = (q(ids) - want).norm() / want.norm()
    assert rel < 0.05, f"int8 relative error {rel:.4f}"
    assert (q(ids).argmax(-1) == want.argmax(-1)).float().mean() > 0.8
    assert q.lm_head.weight.dtype == torch.int8
    sambay.save_model(q, tmp_path / "q8")
    assert torch.equal(sambay.load_model(tmp_path / "q8")(ids), q(ids))


def test_config_json_round_trips_and_reads_transformers_files(tmp_path):
    cfg = preset("tiny-phi3").replace(rope_scaling=LONGROPE, original_max_position_embeddings=8,
                                      max_position_embeddings=64)
    cfg.to_json(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg
    hf = transformers.Phi3Config.from_pretrained(tmp_path)  # transformers reads ours ...
    hf.save_pretrained(tmp_path / "hf")                     # ... and writes its own format back
    back = load_config(tmp_path / "hf" / "config.json")
    for key in ("hidden_size", "num_key_value_heads", "partial_rotary_factor", "rope_theta",
                "original_max_position_embeddings", "tie_word_embeddings", "sliding_window"):
        assert getattr(back, key) == getattr(cfg, key), key
    assert back.longrope and back.rope_scaling["long_factor"] == LONGROPE["long_factor"]


def test_phi4_mini_preset_is_the_released_shape():
    cfg = preset("phi4-mini")
    assert isinstance(cfg, Phi3Config)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (3072, 32, 24, 8, 8192, 200064)
    assert round(cfg.num_parameters() / 1e9, 2) == 3.84
    with torch.device("meta"):  # the formula counts what the module holds
        assert sum(p.numel() for p in sambay.build_model(cfg, device="meta").parameters()) == \
            cfg.num_parameters()
    # Its K/V per token is 25.6x SambaY's, the ratio the efficiency claims rest on; the scaled pair keeps it.
    assert cfg.state_bytes_per_token() / preset("phi4-mini-flash").state_bytes_per_token() == 25.6
    assert preset("phi4-mini-scaled").state_bytes_per_token() / \
        preset("phi4-mini-flash-scaled").state_bytes_per_token() == 25.6


def test_bad_config_is_refused(tmp_path):
    data = preset("tiny-phi3").to_dict()
    data["num_key_value_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(sambay.SambayError, match="not a multiple of num_key_value_heads"):
        load_config(tmp_path / "config.json")
    data = preset("tiny-phi3").to_dict() | {"rope_scaling": {"type": "longrope", "short_factor": [1.0]}}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(sambay.SambayError, match="short_factor must list 6 numbers"):
        load_config(tmp_path / "config.json")


def test_info_on_the_baseline(capsys):
    assert main(["info", "--preset", "phi4-mini"]) == 0
    out = capsys.readouterr().out
    assert "3,836,021,760" in out and "131,072 bytes per token" in out and "96 of 128 dims" in out


def test_train_then_generate_the_baseline(tmp_path, capsys):
    """`sambay train --preset tiny-phi3` learns, exports a Phi3 folder that transformers loads with
    the same logits, and `sambay generate` runs on it with the data's tokenizer."""
    from test_train import prepare_corpus

    data = prepare_corpus(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["--threads", "1", "train", "--preset", "tiny-phi3", "--data", str(data), "--out", str(out),
                 "--steps", "30", "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3", "--warmup", "3",
                 "--eval-every", "30", "--eval-batches", "2", "--quiet"]) == 0
    val = [json.loads(x)["val_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
           if "val_loss" in x]
    assert val[-1] < val[0] - 1.0, val
    model = sambay.load_model(out / "model")
    assert isinstance(model.config, Phi3Config)
    hf = transformers.Phi3ForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert main(["generate", "--model", str(out / "model"), "--max-new-tokens", "8", "To be"]) == 0
    assert "generated 8 tok" in capsys.readouterr().err
