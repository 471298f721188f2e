"""`sambay serve` as a process: check what can be checked at once, listen, run uvicorn over the app
(sambay/serve/app.py) and stop cleanly on SIGINT/SIGTERM.

    sambay serve --model path/to/Phi-4-mini-flash-reasoning --quantize int8
    curl 127.0.0.1:8000/v1/chat/completions -d '{"model": "Phi-4-mini-flash-reasoning",
                                                "messages": [{"role": "user", "content": "Hi"}]}'
    sambay bench serve --clients 1,32 --model DIR   # aggregate tokens/s (sambay/bench)

The server starts listening at once and loads the model on the scheduler thread
(sambay/serve/scheduler.py), which then owns the Engine and batches every request's decode steps:
GET /health is 503 until the model is ready. A model that fails to load stops the server (status 2).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from sambay.errors import SambayError
from sambay.files import is_hub_id
from sambay.runtime.checkpoint import resolve_model
from sambay.serve.app import create_app
from sambay.serve.settings import Settings
from sambay.serve.state import ServerState


def serve(settings: Settings) -> int:
    """Run the server until SIGINT/SIGTERM; 0 once stopped, 2 if the model failed to load.
    Bad settings, a model folder that is not there and a port in use raise SambayError at once."""
    settings.check()
    check_model(settings)
    sock = listen(settings.host, settings.port)
    settings.port = sock.getsockname()[1]
    state = ServerState(settings)
    app = create_app(settings, state)
    # uvicorn's own deadline is a backstop: at --shutdown-timeout the scheduler ends what is still
    # running (streams get an error event and [DONE]), so connections close by themselves.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=settings.shutdown_timeout + 5, timeout_keep_alive=30)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                state.begin_shutdown()
            super().handle_exit(sig, frame)

    server = Server(config)

    def stop(*_):
        server.should_exit = True

    state.on_load_error = stop
    # uvicorn catches SIGINT/SIGTERM itself while running and shuts down gracefully; afterwards it
    # re-raises the signal to the handler it found, which is this one: so a stopped server exits 0.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"sambay: listening on {state.url} ({state.model_name}; loading the model, GET /health is 503 "
          f"until it is ready)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    if state.scheduler.load_error:
        return 2
    print("sambay: stopped", file=sys.stderr, flush=True)
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads so clients can ask /health at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise SambayError(f"cannot listen on {host}:{port} ({e.strerror or e}); is another server using the "
                          f"port? pick another with --port") from None
    sock.setblocking(False)
    return sock


def check_model(settings: Settings) -> None:
    """Fail at once, in one line, on a model that cannot be there (the load itself runs later)."""
    text = None if settings.model is None else str(settings.model)
    hub_repo = text is not None and is_hub_id(text) and not Path(os.path.expanduser(text)).exists()
    if not hub_repo:  # a download can take long: that one is left to the background load
        resolve_model(settings.model)
