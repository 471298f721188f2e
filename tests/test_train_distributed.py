"""`sambay train` under torchrun (2 processes, gloo on CPU): DDP and FSDP2 follow a single process.

With the same global batch (2 ranks x 2 rows = 1 process x 4 rows) and dropout off, the per-step
losses, the validation losses and the final weights must agree to float tolerance. The FSDP2 run is
also stopped by SIGTERM half-way and resumed, so loading a full checkpoint back into shards is
covered too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sambay

from test_train import cli, prepare_corpus, read_metrics

pytestmark = pytest.mark.slow  # every test starts torchrun with two training processes

STEPS = 12
FLAGS = ["--preset", "tiny", "--steps", str(STEPS), "--seq-len", "32", "--grad-accum", "2", "--lr", "3e-3",
         "--warmup", "2", "--eval-every", "4", "--eval-batches", "2", "--save-every", "4", "--quiet"]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "sambay", *args]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return prepare_corpus(tmp_path_factory.mktemp("corpus") / "data")


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    cli("train", *FLAGS, "--batch-size", "4", "--data", str(corpus), "--out", str(out))
    return out


def assert_same_run(got: Path, want: Path) -> None:
    got_train, got_val = read_metrics(got)
    want_train, want_val = read_metrics(want)
    assert sorted(got_train) == list(range(1, STEPS + 1)) and sorted(got_val) == [0, 4, 8, 12]
    assert got_train == pytest.approx(want_train, rel=1e-5, abs=1e-5)
    assert got_val == pytest.approx(want_val, rel=1e-5, abs=1e-5)
    assert want_train[STEPS] < want_train[1] - 0.3  # the run did learn something
    a, b = load_file(got / "model" / "model.safetensors"), load_file(want / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    cfg = sambay.preset("tiny")
    hd = cfg.hidden_size // cfg.num_attention_heads
    keys = slice(cfg.num_attention_heads * hd, (cfg.num_attention_heads + cfg.num_key_value_heads) * hd)
    for name in b:
        got_w, want_w = a[name].clone(), b[name].clone()
        if name.endswith("attn.Wqkv.bias") and got_w.numel() > keys.start:
            # A key bias adds the same amount to all of a query's scores, so its exact gradient is
            # zero and AdamW turns rounding noise into steps: compare it loosely, the rest tightly.
            torch.testing.assert_close(got_w[keys], want_w[keys], rtol=0, atol=1e-3, msg=name)
            got_w[keys] = want_w[keys] = 0
        torch.testing.assert_close(got_w, want_w, rtol=1e-4, atol=2e-5, msg=name)


def test_ddp_matches_single_process(corpus, single, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(torchrun("train", *FLAGS, "--batch-size", "2", "--data", str(corpus),
                                   "--out", str(out)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert_same_run(out, single)
    meta = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert meta["world_size"] == 2 and len(meta["rng"]) == 2
    assert meta["rng"][0]["torch"] != meta["rng"][1]["torch"]  # ranks draw different dropout masks
    # Rank 0 logs alone: one progress/summary stream, not two.
    assert proc.stderr.count("model saved to") == 1
    # A 2-process run cannot be resumed by one process.
    bad = cli("train", "--data", str(corpus), "--out", str(out), "--resume", check=False)
    assert bad.returncode == 2 and "trained on 2 process(es)" in bad.stderr


def test_fsdp_matches_single_process_through_sigterm_and_resume(corpus, single, tmp_path):
    out = tmp_path / "fsdp"
    metrics = out / "metrics.jsonl"
    proc = subprocess.Popen(torchrun("train", *FLAGS, "--batch-size", "2", "--fsdp", "--data", str(corpus),
                                     "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"loss"') >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    log, _ = proc.communicate(timeout=180)
    assert "stopped by SIGTERM" in log, log
    stopped = json.loads((out / "checkpoint" / "trainer.json").read_text())["step"]
    assert 2 <= stopped < STEPS
    resumed = subprocess.run(torchrun("train", "--data", str(corpus), "--out", str(out), "--resume"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped}" in resumed.stderr
    assert_same_run(out, single)
