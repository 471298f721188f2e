"""`sambay bench generation` / `bench memory` end to end on tiny presets, and their errors.

Speed is not asserted (the machine is shared); what is: the figures add up, the batch chosen from
a memory budget is the one a hand count of the state's bytes gives, and the PNGs are PNGs.
"""

import json

import pytest

import sambay
from sambay.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # and restores the thread count `--threads 1` sets

SAMBAY, BASELINE = "tiny", "tiny-phi3"  # SambaY and the Transformer (Phi-3 architecture)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FP32 = 4


def last_json(capsys) -> tuple[str, dict]:
    out = capsys.readouterr().out.strip()
    return out, json.loads(out.splitlines()[-1])


def expected_row_bytes(name: str, context: int) -> int:
    """One row's decode state in float32, counted from the config (context >= any window)."""
    cfg = sambay.preset(name)
    return cfg.state_bytes_fixed(1, FP32) + context * cfg.state_bytes_per_token(FP32)


def test_generation_end_to_end(capsys, tmp_path):
    prompt, lengths = 8, [2, 5, 12]
    context = prompt + lengths[-1]
    weights = FP32 * sambay.preset(SAMBAY).num_parameters()  # tied head: the embedding counts once
    row = expected_row_bytes(SAMBAY, context)
    budget = weights + 3 * row + row // 2  # three rows fit, a fourth does not
    assert main(["--threads", "1", "bench", "generation", "--models", f"{SAMBAY},{BASELINE}",
                 "--prompt", str(prompt), "--lengths", "12,2,5", "--memory-budget", str(budget),
                 "--out", str(tmp_path / "figs")]) == 0
    out, r = last_json(capsys)
    assert r["bench"] == "generation" and r["models"] == [SAMBAY, BASELINE] and r["lengths"] == lengths
    a = r["results"][SAMBAY]
    assert a["weights_bytes"] == weights and a["state_bytes_per_row"] == row
    assert a["budget_batch"] == a["budget"]["batch"] == 3
    b = r["results"][BASELINE]
    b_row = expected_row_bytes(BASELINE, context)
    assert b["budget_batch"] == (budget - FP32 * sambay.preset(BASELINE).num_parameters()) // b_row
    for res in (a, b):
        for run in ("batch1", "budget"):
            rows = res[run]["results"]
            assert [x["tokens"] for x in rows] == lengths
            lat = [x["latency_s"] for x in rows]
            assert lat == sorted(lat) and lat[0] > res[run]["prefill_s"] > 0  # one run, cumulative
            for x in rows:
                assert x["tokens_per_s"] == pytest.approx(res[run]["batch"] * x["tokens"] / x["latency_s"],
                                                          rel=0.01)
            assert res[run]["curve"][-1][0] == lengths[-1]
    assert r["throughput_ratio"] == pytest.approx(
        a["budget"]["results"][-1]["tokens_per_s"] / b["budget"]["results"][-1]["tokens_per_s"], rel=0.02)
    assert r["latency_ratio"] == pytest.approx(
        b["batch1"]["results"][-1]["latency_s"] / a["batch1"]["results"][-1]["latency_s"], rel=0.02)
    assert r["paper"]["throughput_ratio"] == 10
    assert len(r["figures"]) == 2
    for f in r["figures"]:
        assert open(f, "rb").read(8) == PNG_MAGIC
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [  # no temp files left behind
        "generation-latency.png", "generation-throughput.png"]
    table = out.splitlines()[:-1]
    assert any(line.split()[:1] == [SAMBAY] and line.split()[-1] == "3" for line in table)  # rows in budget
    assert any(line.startswith(f"throughput {SAMBAY} / {BASELINE}") and "10x" in line for line in table)
    assert any(line.startswith(f"latency {BASELINE} / {SAMBAY}") and "2-3x" in line for line in table)


def test_memory_end_to_end(capsys, tmp_path):
    assert main(["--threads", "1", "bench", "memory", "--models", f"{SAMBAY},{BASELINE}",
                 "--lengths", "16,32,64", "--chunk", "16", "--out", str(tmp_path)]) == 0
    out, r = last_json(capsys)
    assert r["bench"] == "memory" and r["models"] == [SAMBAY, BASELINE]
    for name in (SAMBAY, BASELINE):
        rows = r["results"][name]["results"]
        assert [x["tokens"] for x in rows] == [16, 32, 64]
        for x in rows:  # the measured state is what the config says (every length >= the window)
            assert x["state_bytes"] == x["state_formula_bytes"] == expected_row_bytes(name, x["tokens"])
            assert x["seconds"] == pytest.approx(x["tokens"] / x["tokens_per_s"], rel=0.01, abs=6e-4)
        assert r["results"][name]["quadratic_share"] is not None
    assert open(r["figures"][0], "rb").read(8) == PNG_MAGIC
    assert sum(line.split()[:1] == [SAMBAY] for line in out.splitlines()) == 3


@pytest.mark.parametrize("argv, message", [
    (["generation", "--models", "tiny,no-such-model"], "no model folder at no-such-model"),
    (["generation", "--models", "tiny"], "exactly two models"),
    (["generation", "--models", "tiny,tiny-phi3", "--lengths", "5000"], "exceeds tiny's context of 4096"),
    (["generation", "--models", "tiny,tiny-phi3", "--lengths", "0,4"], "--lengths must be"),
    (["generation", "--models", "tiny,tiny-phi3", "--memory-budget", "1MiB"], "too small for tiny"),
    (["generation", "--models", "tiny,tiny-phi3", "--memory-budget", "lots"], "--memory-budget must be"),
    (["memory", "--models", "tiny,no-such-model"], "no model folder at no-such-model"),
    (["memory", "--models", "tiny", "--lengths", "8192"], "exceeds tiny's context of 4096"),
])
def test_bad_input_is_one_error_line(capsys, tmp_path, argv, message):
    assert main(["bench", *argv, "--out", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sambay: ")]
    assert len(err) == 1 and err[0].startswith("sambay: error: ") and message in err[0], err
    assert not list(tmp_path.iterdir())  # failed before measuring: no figures
