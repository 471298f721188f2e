"""scripts/load-test (locust) against `sambay serve` in a short bounded form: 32 streaming users on
loopback, random prompt lengths, a fifth of them hanging up mid-stream, at most 96 requests (each
mix run twice by the script: once for the memory baseline, once measured). It must finish with no
failed request, report its figures, leave the server idle and healthy with its memory back."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_server import post, request, wait_idle
from test_server_load import server  # noqa: F401 - the same tiny server fixture

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model is built in-process on one thread

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "load-test"




@pytest.mark.slow
def test_locust_load_script_32_streaming_users_with_disconnects(server):
    out = subprocess.run([sys.executable, str(SCRIPT), "--url", server.url, "--pid", str(server.proc.pid),
                          "--users", "32", "--requests", "96", "--seconds", "30", "--max-tokens", "16",
                          "--max-prompt-words", "40", "--disconnect", "0.2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(out.stdout)
    assert result["requests"] == 96 and result["failures"] == 0, result
    assert result["completed"] + result["dropped"] + result["refused"] == 96, result
    assert result["completed"] > 0 and result["dropped"] > 0, result
    assert result["tokens_per_second"] > 0 and result["ttft_p50_s"] > 0 and result["max_gap_client_s"] > 0
    assert result["max_gap_server_s"] > 0 and result["memory_back"], result
    for label in ("completion tokens/s", "time to first token", "largest gap between tokens"):
        assert label in out.stdout

    assert request(server.url, "GET", "/health")[0] == 200
    wait_idle(server.url)
    status, body = post(server.url, "/v1/completions", {"model": "tiny", "prompt": "The", "max_tokens": 3,
                                                        "temperature": 0, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_the_load_script_refuses_a_server_off_loopback():
    out = subprocess.run([sys.executable, str(SCRIPT), "--url", "http://192.0.2.1:8000"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not on loopback" in out.stderr, out.stderr
