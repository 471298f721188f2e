"""The Phi3 baseline decodes through the same native decode plan as SambaY: RMSNorm, GQA
self-attention with RoPE (plain, partial, LongRoPE) and the SwiGLU MLP as typed records, one native
call per block ("layers") or per step ("stack"), held to the model's own modules."""

import pytest
import torch

import sambay
from decoding import Recording, decoder
from sambay.kernels import NativeOps, prepare_for_inference
from sambay.kernels import native as kernels
from sambay.models import preset
from sambay.models.phi3 import RMSNorm, apply_rope

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(kernels.library() is None, reason="no native kernels on this machine")]

LONGROPE = {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(6)],
            "long_factor": [2.0 + 0.3 * i for i in range(6)]}
VARIANTS = {
    "rope": {"partial_rotary_factor": 1.0},
    "partial-rotary": {},  # tiny-phi3: 0.75 of each head
    # every position under original_max: the short factors, and the attention factor sqrt(2)
    "longrope-short": {"rope_scaling": LONGROPE, "original_max_position_embeddings": 64,
                       "max_position_embeddings": 4096},
    # the decode steps cross original_max (16): the tables switch to the long factors mid-decode
    "longrope-switch": {"rope_scaling": LONGROPE, "original_max_position_embeddings": 16,
                        "max_position_embeddings": 64},
    "gqa-4": {"num_attention_heads": 8, "num_key_value_heads": 2},
    "mha": {"num_key_value_heads": 4},
    "window-5": {"sliding_window": 5},  # ring buffers: the layers keep their own key views
}
# relative error (norm) of the logits against the PyTorch reference, and top-1 agreement: float32
# differs by summation order only; bf16 weights and cache round differently in the native decode
# attention (float32 query); int8 rounds each GEMV's activations too, which turns those small
# differences into a few flipped near-ties of this tiny random model (relative error ~0.03).
BOUNDS = {"float32": (1e-4, 0.99), "bfloat16": (0.02, 0.9), "int8": (0.05, 0.8), "int4": (0.05, 0.8)}


def random_phi3(weights: str, **changes):
    dtype = torch.float32 if weights == "float32" else torch.bfloat16
    model = sambay.build_model(preset("tiny-phi3").replace(**changes), dtype=dtype, seed=0)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # larger than init, so that every layer visibly matters
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return prepare_for_inference(model, weights if weights in ("int8", "int4") else None)


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8", "int4"])
def test_phi3_native_decode_levels_equal_the_modules(variant, weights):
    """"stack" (one native call per step) and "layers" (a norm, an attention and an MLP block per
    layer) run the same kernels in the same order: the same logits and caches bit for bit. Both, and
    the modules with native operations ("ops"), agree with the PyTorch modules to rounding.
    A ragged batch: one left-padded row, so rows sit at different positions and rotations."""
    model = random_phi3(weights, **VARIANTS[variant])
    assert isinstance(model.ops, NativeOps) and model.ops.level == "stack"
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 500, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    calls = []
    lib = Recording(kernels.library(), calls, ("norm_step", "mlp_step", "attention_step", "decode_layers"))
    layers_n, steps = model.config.num_hidden_layers, 14

    decode = decoder(model, ids, mask, lib, calls)

    ref, ref_state = decode(None)
    op_by_op, _ = decode("ops")
    assert not calls
    layers, layers_state = decode("layers")
    assert sorted(set(calls)) == ["attention_step", "mlp_step", "norm_step"]
    assert len(calls) == steps * 3 * layers_n  # the input norm, the attention and the MLP per layer and step
    got, state = decode("stack")
    assert calls == ["decode_layers"] * steps  # one call per step
    assert torch.equal(got, layers)
    for a, b in zip(state.k + state.v, layers_state.k + layers_state.v):
        assert torch.equal(a, b)
    bound, agree = BOUNDS[weights]
    for other in (op_by_op, got):
        assert (other - ref).norm() / ref.norm() < bound
        assert (other.argmax(-1) == ref.argmax(-1)).float().mean() > agree
    assert (got - op_by_op).norm() / op_by_op.norm() < bound / 2  # the same kernels but the blocks' glue
    # the keys the plan wrote (rotated natively) are the reference's to the cache's rounding
    for a, b in zip(state.k, ref_state.k):
        assert (a.float() - b.float()).norm() / b.float().norm() < max(bound, 0.01)
    (key, plan), = state.derived.items()  # built once, kept for the same rows
    assert plan.current(model) and all(s.rope is not None for s in plan.key_sources)
    assert len(plan.key_sources) == (1 if variant == "window-5" else layers_n)  # rings share one key set


def test_rope_rows_equals_apply_rope():
    """The native rotation of q and k heads in a projection's row, against the model's apply_rope:
    full and partial rotary, each row at its own position; heads past `heads` are left alone."""
    lib = kernels.library()
    g = torch.Generator().manual_seed(0)
    B, H, hd = 3, 5, 16
    for r in (16, 12, 4):
        x = torch.randn(B, (H + 2) * hd, generator=g)
        cos, sin = torch.randn(B, r, generator=g), torch.randn(B, r, generator=g)
        want = x.clone()
        heads = x[:, :H * hd].view(B, 1, H, hd)
        want[:, :H * hd] = apply_rope(heads, cos[:, None], sin[:, None]).reshape(B, -1)
        got = x.clone()
        lib.rope_rows(got, H, hd, cos, sin)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(got[:, H * hd:], x[:, H * hd:])


def test_add_rms_norm_equals_the_module():
    lib = kernels.library()
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(40, 1e-5)
    with torch.no_grad():
        norm.weight.add_(torch.randn(40, generator=g))
    h, delta = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    total, out = lib.add_rms_norm(h, delta, norm.weight.detach(), norm.eps)
    assert torch.equal(total, h + delta)
    torch.testing.assert_close(out, norm(h + delta).detach(), rtol=1e-5, atol=1e-6)
    same, out = lib.add_rms_norm(h, kernels.EMPTY, norm.weight.detach(), norm.eps)
    assert same.data_ptr() == h.data_ptr()
    torch.testing.assert_close(out, norm(h).detach(), rtol=1e-5, atol=1e-6)
