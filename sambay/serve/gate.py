"""The Gate: ASGI middleware in front of every route. It refuses what must not reach a handler
before the body is parsed (a wrong API key: 401; a body over --max-request-bytes: 413, measured as
it arrives, so a chunked upload cannot run past it), counts every request in /metrics and writes
the access log, one JSON line per request on stderr.
"""

from __future__ import annotations

import hmac
import json
import sys
import time

from sambay.serve.protocol import APIError
from sambay.serve.state import ServerState

# The endpoints /metrics counts by name; any other path is counted as "other".
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


class Gate:
    """ASGI middleware in front of everything: the API key (401) and body size (413) are checked
    before the body is parsed; every request is counted in /metrics and logged as one JSON line."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        record = scope.setdefault("sambay", {})
        status = 500

        async def send_and_watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            error = self._refuse(scope)
            body = b""
            if error is None:
                body, error = await self._read_body(scope, receive)
                if body is None and error is None:  # the client left while sending
                    status = 499
                    return
            if error is not None:
                await error.response()(scope, receive, send_and_watch)
            else:
                await self.app(scope, _replay(body, receive), send_and_watch)
        finally:
            self._record(scope, status, time.perf_counter() - start, record)

    def _refuse(self, scope) -> APIError | None:
        key = self.state.settings.api_key
        if not key or not scope["path"].startswith("/v1/"):
            return None
        sent = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(sent, b"Bearer " + key.encode()):
            return None
        return APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>' "
                             "with the server's --api-key", type="authentication_error", code="invalid_api_key")

    async def _read_body(self, scope, receive) -> tuple[bytes | None, APIError | None]:
        limit = self.state.settings.max_request_bytes
        too_large = APIError(413, f"the request body is larger than this server accepts ({limit} bytes); "
                                  f"send less, or start the server with a larger --max-request-bytes",
                             code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return b"", too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return b"", too_large
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _record(self, scope, status: int, seconds: float, record: dict) -> None:
        path = scope["path"]
        endpoint = path if path in ROUTES else "/v1/models" if path.startswith("/v1/models/") else "other"
        self.state.metrics.count_request(endpoint, status)
        if not self.state.settings.access_log:
            return
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": scope["method"], "path": path,
                "status": status, "latency_ms": round(seconds * 1000, 1),
                "prompt_tokens": record.get("prompt_tokens"), "completion_tokens": record.get("completion_tokens")}
        if record.get("disconnected"):
            line["client_disconnected"] = True
        client = scope.get("client")
        if client:
            line["client"] = client[0]
        print(json.dumps(line), file=sys.stderr, flush=True)


def _replay(body: bytes, receive):
    """A receive() that gives the already-read body once, then the real messages (disconnect)."""
    done = False

    async def replayed():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
