"""The model against outputs of the official reference implementation (tests/data/golden)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sambay

from conftest import GOLDEN  # noqa: E402 - the shared path


def close(actual, expected, what):
    """Relative error <= 1e-4 of the logits' norm (the issue's fp32 tolerance), per row."""
    err = (actual - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)
    assert float(err.max()) <= 1e-4, f"{what}: relative error {err.tolist()}"
    assert float((actual - expected).abs().max()) <= 1e-3, what  # the README's suggested bound


@pytest.fixture(scope="module")
def model():
    return sambay.load_model(GOLDEN, dtype=torch.float32)


@pytest.fixture(scope="module")
def main():
    return load_file(GOLDEN / "golden.safetensors")


@pytest.fixture(scope="module")
def leftpad():
    return load_file(GOLDEN / "golden_leftpad.safetensors")


@torch.no_grad()
def test_full_forward_and_hidden_states(model, main):
    logits, hidden = model(main["input_ids"], output_hidden_states=True)
    close(logits, main["logits_full"], "logits_full")
    for i, (a, b) in enumerate(zip(hidden, main["hidden_states_full"])):
        assert float((a - b).abs().max()) < 1e-4, f"hidden state {i}"


@torch.no_grad()
@pytest.mark.parametrize("case", ["main", "leftpad"])
def test_teacher_forced_decode(model, case, main, leftpad):
    g = main if case == "main" else leftpad
    ids, P = g["input_ids"], int(g["prefill_len"])
    mask = g.get("attention_mask")
    B, T = ids.shape
    state = model.new_state(batch_size=B, max_length=T)
    prefill = model(ids[:, :P], attention_mask=None if mask is None else mask[:, :P], state=state,
                    logits_to_keep=0)
    real = (mask[:, :P] if mask is not None else torch.ones(B, P)).bool()
    close(prefill[real], g["logits_prefill"][real], "logits_prefill")
    steps = [model(ids[:, t:t + 1], state=state)[:, 0] for t in range(P, T)]
    close(torch.stack(steps, 1), g["logits_decode"], "logits_decode")
    assert state.lengths.tolist() == [T] * B


@torch.no_grad()
def test_leftpad_full_forward(model, leftpad):
    mask = leftpad["attention_mask"].bool()
    logits = model(leftpad["input_ids"], attention_mask=leftpad["attention_mask"])
    close(logits[mask], leftpad["logits_full"][mask], "leftpad logits_full")


@torch.no_grad()
def test_leftpad_rows_equal_unpadded_rows(model, leftpad):
    """A padded row's real tokens give exactly what the row alone gives (no positional encoding)."""
    ids, mask = leftpad["input_ids"], leftpad["attention_mask"].bool()
    padded = model(ids, attention_mask=mask.long())
    for b in range(ids.shape[0]):
        alone = model(ids[b:b + 1, mask[b]])
        assert float((padded[b, mask[b]] - alone[0]).abs().max()) < 1e-4


@torch.no_grad()
def test_short_prefill_decodes_consistently_past_the_window(model):
    """The reference's SWA cache goes wrong here; a correct cache must equal the full forward."""
    q = load_file(GOLDEN / "quirk_short_prefill.safetensors")
    ids, P = q["input_ids"], int(q["prefill_len"])
    state = model.new_state(batch_size=ids.shape[0], max_length=ids.shape[1])
    close(model(ids[:, :P], state=state, logits_to_keep=0), q["logits_prefill"], "short prefill")
    steps = torch.stack([model(ids[:, t:t + 1], state=state)[:, 0] for t in range(P, ids.shape[1])], 1)
    close(steps, q["logits_decode_consistent"], "decode past the window")
    assert float((steps - q["logits_decode_reference"]).abs().max()) > 1.0  # not the reference's bug


@torch.no_grad()
def test_prefill_returns_last_position_only(model, main):
    ids = main["input_ids"][:, :20]
    state = model.new_state(batch_size=2, max_length=48)
    last = model(ids, state=state)
    assert last.shape == (2, 1, 512)
    close(last[:, 0], main["logits_prefill_last"], "logits_prefill_last")
