"""The rig of the fault benchmarks: a gateway process in front of a stand-in vLLM, a TCP proxy that
plays a PostgreSQL outage, a throwaway PostgreSQL database, and what the traffic log holds.

Everything runs on 127.0.0.1; every process is started through `bench.gateway_harness.Processes`
(its own process group, stopped whatever happens). Imports `bench` and `core` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa

from bench.gateway_harness import HOST, Proc, Processes, wait_ready
from core.db import Request, make_engine, session_factory, session_scope, upgrade
from core.io import free_port
from core.keys import create_key

POSTGRES_URLS = (
    "postgresql://tunegate:tunegate@127.0.0.1:5432/tunegate",
    "postgresql://root@127.0.0.1:5432/test",
    "postgresql://postgres@127.0.0.1:5432/test",
)
CHAT = {"model": "base", "messages": [{"role": "user", "content": "What is the answer?"}], "max_tokens": 8}


def chat(content: str, stream: bool = False) -> dict:
    return {**CHAT, "messages": [{"role": "user", "content": content}], "stream": stream}


def start_upstream(procs: Processes, port: int) -> Proc:
    """`bench.fault_upstream` on `port`, answering."""
    proc = procs.start(f"upstream-{port}", [sys.executable, "-m", "bench.fault_upstream", "--port", str(port)])
    wait_ready(proc, f"http://{HOST}:{port}", ["/v1/models"], None, 60)
    return proc


@dataclass
class Gateway:
    """A gateway process: where it answers, its key, its database."""

    url: str
    key: str
    db_url: str
    proc: Proc

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def post(self, body: dict, timeout: float = 30.0) -> httpx.Response:
        return httpx.post(self.url + "/v1/chat/completions", json=body, headers=self.headers, timeout=timeout)

    def logged(self) -> list[int]:
        """The status of every row in the traffic log."""
        engine = make_engine(self.db_url)
        try:
            with session_factory(engine)() as session:
                return list(session.scalars(sa.select(Request.status_code)))
        finally:
            engine.dispose()


def make_key(db_url: str, name: str, role: str) -> str:
    """A new API key `name` with `role` in the (migrated) database `db_url`: the secret."""
    engine = make_engine(db_url)
    try:
        with session_scope(session_factory(engine)) as session:
            return create_key(session, name, role)[0]
    finally:
        engine.dispose()


def start_gateway(
    procs: Processes, var_dir: Path, vllm_url: str, db_url: str | None = None, gateway: dict | None = None,
    guardrails: bool = True, key_db_url: str | None = None, env: dict[str, str] | None = None,
) -> Gateway:  # fmt: skip
    """`gateway.app:create_app` under uvicorn in its own process, like `tunegate serve` runs it; the
    database migrated and a key made first (through `key_db_url`, when the gateway's URL is a proxy)."""
    var_dir.mkdir(parents=True, exist_ok=True)
    db_url = db_url or f"sqlite:///{var_dir / 'tunegate.db'}"
    direct = key_db_url or db_url
    upgrade(direct)
    key = make_key(direct, "bench", "app")
    port = free_port()
    env = {
        **(env or {}),
        "TUNEGATE_VAR_DIR": str(var_dir),
        "TUNEGATE_DATABASE__URL": db_url,
        "TUNEGATE_VLLM__URL": vllm_url,
        "TUNEGATE_GUARDRAILS__ENABLED": "true" if guardrails else "false",
        "TUNEGATE_GATEWAY__REQUESTS_PER_MINUTE": "100000000",
        "TUNEGATE_GATEWAY__TOKENS_PER_MINUTE": "100000000000",
        "TUNEGATE_GATEWAY__LOG_FLUSH_INTERVAL_S": "0.05",
        **{f"TUNEGATE_GATEWAY__{k.upper()}": str(v) for k, v in (gateway or {}).items()},
    }
    cmd = [
        sys.executable, "-m", "uvicorn", "gateway.app:create_app", "--factory", "--host", HOST,
        "--port", str(port), "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    proc = procs.start(f"gateway-{port}", cmd, env=env)
    url = f"http://{HOST}:{port}"
    wait_ready(proc, url, ["/healthz", "/readyz"], None, 120)
    return Gateway(url, key, db_url, proc)


def rss_bytes(pid: int) -> int:
    """Resident memory of one process, from /proc (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TcpProxy:
    """A TCP forwarder on a port of its own, in a thread; `down()` closes the listener and every
    connection through it (the server behind it looks stopped), `up()` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass  # close(): the connection is gone either way (a cancelled task here only makes noise)
        self.writers -= {writer, up_writer}

    async def _up(self) -> None:
        self.server = await asyncio.start_server(self._client, HOST, self.port, reuse_address=True)

    async def _down(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self.writers.clear()

    def up(self) -> TcpProxy:
        self._call(self._up())
        return self

    def down(self) -> None:
        self._call(self._down())

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        self.down()
        self._call(self._cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@contextlib.contextmanager
def temp_postgres(server_url: str | None = None) -> Iterator[sa.URL]:
    """A PostgreSQL database made for this run (dropped after): its URL. Raises RuntimeError when no
    server of `server_url`, `TUNEGATE_TEST_POSTGRES_URL` or the usual local ones answers."""
    import psycopg

    candidates = [server_url] if server_url else [os.environ.get("TUNEGATE_TEST_POSTGRES_URL") or "", *POSTGRES_URLS]
    errors = []
    for candidate in filter(None, candidates):
        try:
            admin = psycopg.connect(candidate, autocommit=True, connect_timeout=5)
            break
        except psycopg.OperationalError as err:
            errors.append(str(err).strip()[:200])
    else:
        raise RuntimeError("PostgreSQL is not reachable: " + "; ".join(errors))
    name = f"tunegate_faults_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield sa.make_url(candidate).set(drivername="postgresql+psycopg", database=name)
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@contextlib.contextmanager
def proxied_postgres(db_url: str | None = None) -> Iterator[tuple[TcpProxy, str, str]]:
    """A `TcpProxy` in front of the PostgreSQL database `db_url` (or one made for the run): the proxy,
    the database's own URL and its URL through the proxy."""
    with contextlib.nullcontext(sa.make_url(db_url)) if db_url else temp_postgres() as url:
        proxy = TcpProxy(url.host or HOST, url.port or 5432).up()
        try:
            via_proxy = url.set(host=HOST, port=proxy.port).render_as_string(hide_password=False)
            yield proxy, url.render_as_string(hide_password=False), via_proxy
        finally:
            proxy.close()
