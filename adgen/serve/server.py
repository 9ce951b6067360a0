"""Running the app with uvicorn: in the foreground (`adgen serve`) or in a thread (tests, benchmarks)."""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time

from adgen.serve.settings import ServeSettings, check_bind
from adgen.serve.training_jobs import TrainingJobs

log = logging.getLogger(__name__)

# uvicorn's own guards, on top of the app's: connection count, keep-alive, graceful shutdown.
LIMIT_CONCURRENCY = 1024  # open connections + tasks; 503 above (a flood cannot exhaust memory)
TIMEOUT_KEEP_ALIVE = 5
TIMEOUT_GRACEFUL_SHUTDOWN = 5


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uvicorn_config(app, host: str, port: int, *, log_level: str = "warning"):
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        limit_concurrency=LIMIT_CONCURRENCY,
        timeout_keep_alive=TIMEOUT_KEEP_ALIVE,
        timeout_graceful_shutdown=TIMEOUT_GRACEFUL_SHUTDOWN,
        server_header=False,
        proxy_headers=False,  # never trust X-Forwarded-* from clients
        ws="none",
    )


def build(settings: ServeSettings, state=None):
    """(state, app) for the settings; checks the bind first so nothing is loaded for a refused one."""
    from adgen.serve.api import create_app
    from adgen.serve.service import ServeState

    check_bind(settings.host, settings.resolved_api_key(), settings.insecure)
    state = state or ServeState.load(settings)
    if settings.ui and settings.ui_training and state.training is None:
        # the web UI's training page: its runs beside the Batch API's files
        state.training = TrainingJobs(settings.resolved_state_dir() / "ui-runs")
    return state, create_app(state)


def serve_forever(settings: ServeSettings, *, log_level: str = "info") -> None:
    import uvicorn

    state, app = build(settings)
    print(f"adgen serve: {kv_cache_line(state.scheduler)}", file=sys.stderr)
    try:
        uvicorn.Server(uvicorn_config(app, settings.host, settings.port, log_level=log_level)).run()
    finally:
        state.close()


def kv_cache_line(scheduler) -> str:
    """What the startup line says of the KV cache: its budgeted size on a GPU, else how it is sized."""
    if scheduler.kv_plan is not None:
        return scheduler.kv_plan.describe()
    info = scheduler.kv_cache_info()
    if info is None:
        return "no continuous batching: model.generate sizes its own cache per batch"
    return f"KV cache {info['slots']} slots, grown on demand with the longest request (no GPU budget)"


class ServerThread:
    """uvicorn in a background thread on a loopback port: `with ServerThread(app) as srv: srv.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, *, state=None) -> None:
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        self.state = state
        self.server = uvicorn.Server(uvicorn_config(app, self.host, self.port))
        self.server.install_signal_handlers = lambda: None  # noqa: E731 (not the main thread)
        self.thread = threading.Thread(target=self.server.run, name="adgen-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        if self.state is not None:
            with contextlib.suppress(Exception):
                self.state.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
