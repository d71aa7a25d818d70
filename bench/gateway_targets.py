"""Gateway overhead, the proxies under test: LiteLLM's proxy and tunegate's gateway, each started
in front of the mock upstream and returned once it answers.

Both get production-like settings and are started the way their users start them: LiteLLM from
its own CLI with a config file (spend and error logs off, no database), tunegate with `tunegate
serve` against the mock as its vLLM, a key made with `tunegate keys create` and the per-key limits
lifted (`OURS_ENV`). Each start fills in an `info` dict as it goes, so that a failure still tells
what was tried, and stops the proxy again if it never answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from bench.gateway_config import ROOT, GatewayBenchConfig
from bench.gateway_harness import HOST, Processes, Target, http, wait_ready
from core.io import free_port

OURS_ENV = {
    # measure the gateway's overhead, not its per-key limiter: lift the default limits
    "TUNEGATE_GATEWAY__REQUESTS_PER_MINUTE": "100000000",
    "TUNEGATE_GATEWAY__TOKENS_PER_MINUTE": "100000000000",
    # the comparison is proxy against proxy: guardrails off (authentication, logging, metrics stay on)
    "TUNEGATE_GUARDRAILS__ENABLED": "false",
}
LITELLM_SETTINGS = {
    "litellm_settings": {"drop_params": True, "set_verbose": False, "json_logs": True, "request_timeout": 600},
    "general_settings": {
        "disable_spend_logs": True,
        "disable_error_logs": True,
        "allow_requests_on_db_unavailable": True,
    },
}
LITELLM_ENV = {
    "LITELLM_LOG": "ERROR",
    # no network here: use the model cost map that ships in the package instead of fetching it
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}
LITELLM_MASTER_KEY = "sk-bench-gateway-overhead"


def litellm_version(litellm_bin: str) -> str | None:
    python = Path(litellm_bin).parent / "python"
    if not python.exists():
        return None
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return out.stdout.strip() or None


def find_litellm(explicit: str | None) -> str | None:
    candidates = (explicit, os.environ.get("LITELLM_BIN"), str(ROOT / ".venv-litellm" / "bin" / "litellm"),
                  str(ROOT / ".venv" / "bin" / "litellm"))  # fmt: skip
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    return shutil.which("litellm")


def litellm_config(mock_url: str, model: str) -> dict:
    return {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {"model": f"openai/{model}", "api_base": f"{mock_url}/v1", "api_key": "sk-mock"},
            }
        ],
        "litellm_settings": dict(LITELLM_SETTINGS["litellm_settings"]),
        "general_settings": {"master_key": LITELLM_MASTER_KEY, **LITELLM_SETTINGS["general_settings"]},
    }


def start_litellm(procs: Processes, tmp: Path, mock_url: str, config: GatewayBenchConfig, info: dict) -> Target:
    """A started, answering LiteLLM proxy; `info` gets what was used (filled in as it goes, so that
    a failure still tells). A proxy that fails is stopped."""
    litellm_bin = find_litellm(config.litellm_bin)
    if litellm_bin is None:
        raise RuntimeError("no `litellm` found: pip install 'litellm[proxy]', or pass --litellm-bin")
    settings = litellm_config(mock_url, config.model)
    config_path = tmp / "litellm.yaml"
    config_path.write_text(json.dumps(settings, indent=2))  # JSON is YAML
    port = free_port()
    cmd = [
        litellm_bin, "--config", str(config_path), "--host", HOST, "--port", str(port),
        "--num_workers", str(config.litellm_workers),
    ]  # fmt: skip
    info.update(
        {
            "version": litellm_version(litellm_bin),
            "command": cmd,
            "config": {**settings, "general_settings": {**settings["general_settings"], "master_key": "sk-…"}},
            "env": dict(LITELLM_ENV),
            "num_workers": config.litellm_workers,
            "database": None,
        }
    )
    proc = procs.start("litellm", cmd, env=LITELLM_ENV)
    base = f"http://{HOST}:{port}"
    try:
        info["ready_path"] = wait_ready(
            proc, base, ["/health/liveliness", "/v1/models"], LITELLM_MASTER_KEY, config.start_timeout
        )
    except BaseException:
        procs.stop(proc)
        raise
    return Target("litellm", base, LITELLM_MASTER_KEY, config.model, proc)


def _json_with_key(text: str) -> dict | None:
    """The JSON object with a `key` field in a command's output (log lines around it tolerated)."""
    starts = [line.strip() for line in reversed(text.splitlines()) if line.strip().startswith("{")]
    start, end = text.find("{"), text.rfind("}")
    for candidate in [text, *starts, text[start : end + 1] if 0 <= start < end else ""]:
        with contextlib.suppress(ValueError):
            obj = json.loads(candidate)
            if isinstance(obj, dict) and "key" in obj:
                return obj
    return None


def start_ours(procs: Processes, tmp: Path, mock_url: str, config: GatewayBenchConfig, info: dict) -> Target:
    """A started, answering tunegate gateway; `info` gets what was used (filled in as it goes, so
    that a failure still tells). A gateway that fails is stopped."""
    port = free_port()
    var_dir = tmp / "tunegate-var"
    var_dir.mkdir(exist_ok=True)
    env = {"TUNEGATE_VAR_DIR": str(var_dir), **OURS_ENV}
    if config.ours_workers:
        env["TUNEGATE_GATEWAY__WORKERS"] = str(config.ours_workers)
    for item in config.ours_env:
        name, _, value = item.partition("=")
        env[name] = value
    fmt = {"MOCK_URL": mock_url, "PORT": str(port), "HOST": HOST}
    tunegate = str(ROOT / ".venv" / "bin" / "tunegate")
    template = config.ours_cmd or [tunegate, "serve", "--vllm-url", "{MOCK_URL}", "--port", "{PORT}", "--no-workers"]
    cmd = [part.format(**fmt) for part in template]
    key_cmd = list(config.ours_key_cmd or [tunegate, "keys", "create", "bench", "--role", "app", "--json"])
    info.update({"command": cmd, "key_command": key_cmd, "env": {**env, "TUNEGATE_VAR_DIR": "<tmp>"}})
    full_env = {**os.environ, **env}
    if config.ours_migrate:
        migrate = [tunegate, "db", "upgrade"]
        done = subprocess.run(migrate, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=180)
        info["migrate"] = {"command": migrate, "rc": done.returncode}
    made = subprocess.run(key_cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=180)
    obj = _json_with_key(made.stdout)
    if made.returncode != 0 or obj is None:
        raise RuntimeError(
            f"`{' '.join(key_cmd)}` exited {made.returncode} without a key: "
            f"{(made.stdout + made.stderr).strip()[-800:]}"
        )
    key = str(obj["key"])
    proc = procs.start("ours", cmd, env=env)
    base = f"http://{HOST}:{port}"
    try:
        info["ready_path"] = wait_ready(proc, base, ["/readyz", "/v1/models"], key, config.start_timeout)
        model = config.ours_model
        if not model:
            status, body = http("GET", base + "/v1/models", key=key)
            ids = [m.get("id") for m in body.get("data", [])] if status == 200 and isinstance(body, dict) else []
            model = ids[0] if ids else "base"
    except BaseException:
        procs.stop(proc)
        raise
    info["model"] = model
    return Target("ours", base, key, model, proc)
