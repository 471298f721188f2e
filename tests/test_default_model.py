"""The embedded default model: what the README's main command runs when no --model is given."""

import math
from pathlib import Path

import torch
import torch.nn.functional as F

import sambay
from sambay.cli import main

FOLDER = Path(sambay.__file__).parent / "default_model"
TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
        "And God said, Let there be light: and there was light.")


def test_it_is_a_small_sambay_in_the_phi4_flash_layout():
    size = sum(f.stat().st_size for f in FOLDER.iterdir())
    assert size <= 25 * 2**20
    model = sambay.load_model()  # no path: the embedded model
    cfg = model.config
    assert "default_model" in str(model.source)
    assert cfg.layout == "MSMSMA|GX" and cfg.differential_attention
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


@torch.no_grad()
def test_it_has_learned_english():
    """Mean loss on an English passage far below chance (ln V) and far below shuffled tokens."""
    model, tok = sambay.load_model(dtype=torch.float32), sambay.load_tokenizer()  # no path: the embedded pair
    assert tok.encode(TEXT) == sambay.load_tokenizer(FOLDER).encode(TEXT)
    ids = torch.tensor([tok.encode(TEXT)])
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]

    def loss(x):
        logits = model(x)[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()

    chance = math.log(model.config.vocab_size)
    assert loss(ids) < chance - 2.5, (loss(ids), chance)  # 5.1 vs 8.3 for the committed model
    assert loss(ids) < loss(shuffled) - 1.5


def test_generate_without_model_writes_words(capsys):
    assert main(["--threads", "1", "generate", "--seed", "0", "--max-new-tokens", "40", "ROMEO:"]) == 0
    text = capsys.readouterr().out
    words = text.split()
    assert len(words) >= 15
    letters = sum(c.isalpha() or c.isspace() for c in text)
    assert letters / len(text) > 0.85  # words, not byte soup
