"""Model behaviour beyond the golden data: config variants, decode state, dtypes, errors."""

import pytest
import torch

import sambay
from sambay.models.config import SambaYConfig


def random_model(name="tiny", dtype=torch.float32, seed=0, **changes):
    cfg = sambay.preset(name).replace(**changes)
    model = sambay.build_model(cfg, dtype=dtype, seed=seed)
    # Larger-than-init weights so that every layer visibly matters in the comparisons below.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


VARIANTS = {
    "tiny": {},
    "no-differential": {"differential_attention": False},
    "no-window": {"sliding_window": None},
    "window-1": {"sliding_window": 1},
    "16-layers": {"num_hidden_layers": 16},
    "gqa-4": {"num_attention_heads": 8, "num_key_value_heads": 2},
}


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_equals_full_forward(variant):
    model = random_model(**VARIANTS[variant])
    ids = torch.randint(0, 500, (2, 30), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    for prefill in (1, 5, 12):  # shorter and longer than the window of 8
        state = model.new_state(2, 30)
        got = [model(ids[:, :prefill], state=state, logits_to_keep=0)]
        got += [model(ids[:, t:t + 1], state=state) for t in range(prefill, 30)]
        torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_chunked_prefill_equals_one_prefill():
    model = random_model()
    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(4))
    full = model(ids)
    state = model.new_state(1, 40)
    parts = [model(ids[:, a:b], state=state, logits_to_keep=0) for a, b in ((0, 3), (3, 20), (20, 40))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_rows_at_different_lengths_decode_together():
    """Ragged prompts: prefill each row through a view, then decode all rows in one call."""
    model = random_model()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 500, (1, n), generator=g) for n in (3, 11, 6)]
    nexts = torch.randint(0, 500, (3, 4), generator=g)
    state = model.new_state(3, 32)
    for i, p in enumerate(prompts):
        model(p, state=state.rows(i))
    assert state.lengths.tolist() == [3, 11, 6]
    batched = torch.cat([model(nexts[:, t:t + 1], state=state) for t in range(4)], 1)
    for i, p in enumerate(prompts):
        alone = model(torch.cat([p, nexts[i:i + 1]], 1))[:, -4:]
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_row_reset_reuses_a_slot():
    model = random_model()
    ids = torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(6))
    state = model.new_state(2, 16)
    model(ids, state=state)
    state.rows(1).reset()
    assert state.lengths.tolist() == [10, 0]
    again = model(ids[1:2, :7], state=state.rows(1))
    torch.testing.assert_close(again[:, 0], model(ids[1:2, :7])[:, -1], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_cross_decoder_runs_only_for_kept_positions(monkeypatch):
    model = random_model()
    seen = []
    cross = model.model.layers[-1]
    orig = cross.forward
    monkeypatch.setattr(cross, "forward", lambda h, *a: (seen.append(h.shape[1]), orig(h, *a))[1])
    model(torch.zeros(1, 20, dtype=torch.long), state=model.new_state(1, 20))
    model(torch.zeros(1, 20, dtype=torch.long))
    assert seen == [1, 20]


@torch.no_grad()
def test_bfloat16_weights_track_float32():
    m32 = random_model()
    m16 = sambay.build_model(m32.config, dtype=torch.bfloat16, init=False)
    m16.load_state_dict(m32.state_dict())
    assert m16.model.layers[0].attn.A_log.dtype == torch.float32  # kept in fp32 like the checkpoint
    assert m16.model.layers[1].attn.inner_cross_attn.lambda_q1.dtype == torch.float32
    ids = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(7))
    a, b = m32(ids), m16(ids)
    assert b.dtype == torch.float32
    rel = (a - b).norm() / a.norm()
    assert rel < 0.05, rel
    state = m16.new_state(1, 24)
    assert state.ssm[0].dtype == torch.float32 and state.k[1].dtype == torch.bfloat16
    steps = [m16(ids[:, :12], state=state)] + [m16(ids[:, t:t + 1], state=state) for t in range(12, 24)]
    assert ((torch.cat(steps, 1) - b[:, 11:]).norm() / b[:, 11:].norm()) < 0.05


def test_gradients_flow_to_every_parameter():
    model = random_model().train()
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(8))
    model(ids).logsumexp(-1).mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 6}, "multiple of 4"),
    ({"num_attention_heads": 3, "num_key_value_heads": 1, "hidden_size": 63}, "must both be even"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"mb_per_layer": 3}, "mb_per_layer"),
    ({"sliding_window": 0}, "sliding_window"),
])
def test_config_layout_rules(changes, message):
    with pytest.raises(sambay.SambayError, match=message):
        sambay.preset("tiny").replace(**changes)


def test_config_json_round_trip(tmp_path):
    src = "tests/data/golden/phi4flash-tiny/config.json"
    cfg = SambaYConfig.from_json(src)
    assert cfg.extra["_attn_implementation"] == "flash_attention_2"
    cfg.to_json(tmp_path / "config.json")
    import json
    assert json.load(open(tmp_path / "config.json")) | {} == json.load(open(src)) | {
        "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": "auto",
        "mamba_conv_bias": True, "mamba_proj_bias": False}


def test_real_config_shape():
    cfg = sambay.preset("phi4-mini-flash")
    assert cfg.num_parameters() == 3_852_562_944
    assert cfg.layout == "MSMSMSMSMSMSMSMSMA|GXGXGXGXGXGXGX"
    assert cfg.state_bytes_per_token() == 5120  # 20 KV heads x 64 x (K+V) x 2 bytes
    meta = sambay.build_model(cfg, dtype=torch.bfloat16, device="meta")
    assert sum(p.numel() for p in meta.parameters()) == 3_852_562_944


@torch.no_grad()
def test_state_errors():
    model = random_model()
    state = model.new_state(2, 8)
    with pytest.raises(sambay.SambayError, match="at most 8"):
        model(torch.zeros(2, 9, dtype=torch.long), state=state)
    with pytest.raises(sambay.SambayError, match="batch size"):
        model(torch.zeros(3, 2, dtype=torch.long), state=state)
    with pytest.raises(sambay.SambayError, match="left padding"):
        model(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1], [1, 1, 1]]),
              state=state)
    model(torch.zeros(1, 2, dtype=torch.long), state=state.rows(0))
    with pytest.raises(sambay.SambayError, match="same length"):
        model(torch.zeros(2, 2, dtype=torch.long), state=state)
