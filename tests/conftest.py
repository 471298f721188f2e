"""Shared paths and fixtures of the test suite.

Markers: `slow` for tests that take more than a few seconds (deselect with -m "not slow").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden" / "phi4flash-tiny"  # the official reference's outputs on a tiny model
GOLDEN_TOKENIZER = DATA / "golden" / "tokenizer"


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module: the tiny test models are many times faster on one, and two test
    processes (a server and its client) then do not fight over the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
