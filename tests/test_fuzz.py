"""`sambay serve` against requests generated from its own OpenAPI schema (schemathesis): every
route, a few hundred cases, bounded in count and time, on loopback. No answer may be a 5xx (nor a
stream end in a server error), and the
server must still answer a normal request correctly afterwards, with nothing left running.

Generated bodies name a random model most of the time (a 404 at once); a hypothesis draw puts the
served name in four of five, so the sampling, tools, grammar and streaming paths are reached.
"""

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sambay.bench.serve import wait_ready
from test_server import Server, post, request, tiny_folder, wait_idle

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model is built in-process on one thread

CASES = {"POST": 150, "GET": 25}  # per route: a few hundred in all (a GET without parameters has one)
SECONDS_PER_ROUTE = 60.0  # the bound in time: a route stops generating once past it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tiny_folder(tmp_path_factory), tmp_path_factory.mktemp("fuzz") / "server.log",
               "--served-model-name", "tiny", "--max-batch-size", "4", "--max-queue", "16",
               "--max-model-len", "128", "--max-tokens", "8", "--no-access-log")
    wait_ready(s.url, proc=s.proc)
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


def fuzz_route(url: str, operation, cases: int, seconds: float) -> dict[int, int]:
    """Send up to `cases` generated requests to one operation (fewer once `seconds` have passed);
    returns how many answers had each status. Fails on the first 5xx, naming the request."""
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds

    @settings(max_examples=cases, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(), served=st.integers(0, 4).map(lambda i: i < 4))
    def run(case, served):
        if time.monotonic() > deadline:
            return
        if served and isinstance(case.body, dict):
            case.body["model"] = "tiny"
        if served and "name" in (case.path_parameters or {}):
            case.path_parameters["name"] = "tiny"
        response = case.call(base_url=url, timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (f"{case.method} {case.path} answered {response.status_code}: "
                                            f"{response.text[:500]}\nbody: {case.body!r}")
        if "event-stream" in str(response.headers.get("content-type")):  # an error mid-stream
            assert '"server_error"' not in response.text, f"{response.text[-500:]}\nbody: {case.body!r}"

    run()
    return statuses


@pytest.mark.slow
def test_generated_requests_on_every_route_get_no_5xx_and_leave_the_server_healthy(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    routes = {f"{op.method.upper()} {op.path}" for op in operations}
    assert routes == {"GET /health", "GET /metrics", "GET /v1/models", "GET /v1/models/{name}",
                      "POST /v1/chat/completions", "POST /v1/completions"}
    total, per_route = {}, {}
    for op in operations:
        statuses = fuzz_route(server.url, op, CASES[op.method.upper()], SECONDS_PER_ROUTE)
        per_route[f"{op.method.upper()} {op.path}"] = statuses
        for status, count in statuses.items():
            total[status] = total.get(status, 0) + count
    print(per_route)
    assert sum(total.values()) >= 200, total
    assert any(200 <= s < 300 for s in total) and any(400 <= s < 500 for s in total), total

    # Healthy afterwards: nothing running or queued, and a plain request answered as before.
    wait_idle(server.url, timeout=30)
    status, _, _ = request(server.url, "GET", "/health")
    assert status == 200
    status, body = post(server.url, "/v1/completions",
                        {"model": "tiny", "prompt": "The old lighthouse keeper", "max_tokens": 8, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1, body
    assert server.proc.poll() is None


@pytest.mark.slow
def test_what_the_fuzzing_found_stays_fixed(server):
    # A repetition penalty or temperature this small divided the logits to inf and the draw to NaN:
    # a 500 that also ended every other request in the batch.
    chat = {"model": "tiny", "messages": [{"role": "tool"}], "max_tokens": 4, "seed": 0}
    status, body = post(server.url, "/v1/chat/completions", {**chat, "repetition_penalty": 5e-324})
    assert status == 400 and body["error"]["type"] == "invalid_request_error", body
    status, body = post(server.url, "/v1/chat/completions", {**chat, "temperature": 5e-324})
    assert status == 200, body
    status, greedy = post(server.url, "/v1/chat/completions", {**chat, "temperature": 0})
    assert body["choices"][0]["message"] == greedy["choices"][0]["message"]  # a near-0 temperature is near-greedy
