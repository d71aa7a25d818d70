"""`tunegate serve`: vLLM (unless one is given), then the gateway under uvicorn, until SIGTERM/Ctrl-C.

Order matters: the database is migrated and vLLM is ready before the gateway accepts a request;
on shutdown uvicorn stops accepting, finishes requests in flight and runs the gateway's lifespan
exit (which writes every queued traffic-log row), and only then is vLLM stopped. Killed outright
(SIGKILL, the OOM killer), this process cannot stop vLLM itself: the kernel sends vLLM SIGTERM
(`core.vllm`'s parent-death signal, set when it was started from this, the main, thread), so no
orphan keeps the port and the memory. The gateway is named by string (`gateway.app:create_app`):
the spine never imports it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from rich.console import Console

from core.db import migrate
from core.io import free_port
from core.settings import Settings
from core.vllm import VllmServer


class ServerThread:
    """An ASGI app served by uvicorn on a free port in a background thread of this process (the demo's
    gateway, and the tests' servers): real HTTP for real clients, stopped gracefully on exit."""

    def __init__(self, app, start_timeout_s: float = 30.0) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        import time

        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True  # graceful: lifespan exit runs (the traffic log is drained)
        self.thread.join(timeout=60)

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Stopped(Exception):
    pass


def _stop(signum, frame) -> None:
    raise _Stopped


def serve(
    settings: Settings,
    vllm_url: str | None,
    host: str,
    port: int,
    workers: int,
    background: bool,
    config_file: Path | None,
    console: Console,
) -> None:
    import uvicorn

    migrate.upgrade(settings.database_url)
    server = None
    vllm_url = vllm_url or settings.vllm.url
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal; these handlers turn
    # that (or a signal while vLLM starts) into a normal return, so vLLM is stopped and the exit code is 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    try:
        if not vllm_url:
            from training.bootstrap import base_model_path

            log_path = settings.var_dir / "logs" / "vllm.log"
            server = VllmServer(
                base_model_path(settings, progress=True),
                settings.base_model.served_name,
                settings.vllm,
                log_path=log_path,
            )
            console.print(f"starting vLLM on {server.url} (log: {log_path}) ...")
            server.start()
            server.wait_ready()
            vllm_url = server.url
        # Every uvicorn worker builds its own app from the environment: hand it what we decided.
        os.environ["TUNEGATE_VLLM__URL"] = vllm_url
        if config_file:
            os.environ["TUNEGATE_CONFIG"] = str(config_file.resolve())
        if not background:
            os.environ["TUNEGATE_GATEWAY__BACKGROUND_TASKS"] = "false"
        console.print(f"gateway on http://{host}:{port} -> vLLM {vllm_url}; Ctrl-C or SIGTERM stops both")
        uvicorn.run(
            "gateway.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=30,
        )
    except _Stopped:
        pass
    finally:
        if server is not None:
            console.print("stopping vLLM")
            server.stop()
