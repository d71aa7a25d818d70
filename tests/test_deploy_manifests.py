"""The deployment artefacts: deploy/compose (Compose specification schema) and deploy/k8s (kustomize base and
overlays, Kubernetes 1.30 schemas through kubernetes-validate), plus what no schema checks: references,
health checks, probes on the gateway's real endpoints, the autoscaler's and the budget's targets, GPUs,
and that every TUNEGATE_* variable is a real setting. `make check-deploy` runs the schema checks; a
broken copy of a manifest must make it fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.settings import CONFIG_ENV, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.30.0"
CHECK = DEPLOY / "scripts" / "check-deploy.sh"

sys.path.insert(0, str(K8S))
import render  # noqa: E402  (deploy/k8s/render.py)


def tunegate_setting(name: str) -> bool:
    """Whether the environment variable `name` (`TUNEGATE_GATEWAY__PORT`) sets a field of `Settings`."""
    if name == CONFIG_ENV:
        return True
    if not name.startswith("TUNEGATE_"):
        return False
    model = Settings
    for part in name.removeprefix("TUNEGATE_").lower().split("__"):
        if model is None or part not in model.model_fields or (model is Settings and part == "config_file"):
            return False
        model = settings_section(model.model_fields[part].annotation)
    return model is None  # a value, not a whole section


def settings_section(annotation):
    from core.settings import _model_in  # the settings' own walk over Optional/Union annotations

    return _model_in(annotation)


def test_setting_helper() -> None:
    assert tunegate_setting("TUNEGATE_DATABASE__URL")
    assert tunegate_setting("TUNEGATE_SECRET_KEY")
    assert tunegate_setting("TUNEGATE_GATEWAY__LIMITS__MAX_MESSAGES")
    assert not tunegate_setting("TUNEGATE_DATABASE__URLS")
    assert not tunegate_setting("TUNEGATE_DATABASE")  # a section, not a value
    assert not tunegate_setting("TUNEGATE_SECRET_KEY__X")
    assert not tunegate_setting("REDIS_URL")


# --- compose ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_schema() -> None:
    result = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_and_references(compose: dict) -> None:
    services = compose["services"]
    assert {"gateway", "vllm", "worker", "postgres", "redis", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        assert "healthcheck" in service and service["healthcheck"].get("test"), f"{name} has no healthcheck"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
    gateway = services["gateway"]
    for store in ("postgres", "redis", "vllm"):
        assert gateway["depends_on"][store]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(gateway["healthcheck"]["test"])
    registry = {v.split(":")[0] for s in ("vllm", "gateway", "worker") for v in services[s]["volumes"]}
    assert "tunegate-var" in registry and "postgres-data" in {v.split(":")[0] for v in services["postgres"]["volumes"]}
    vllm = services["vllm"]
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "--enable-lora" in vllm["command"]
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    prometheus, grafana = services["prometheus"]["volumes"], services["grafana"]["volumes"]
    assert "../prometheus:/etc/prometheus:ro" in prometheus
    assert any(v.startswith("../grafana/provisioning:") for v in grafana)


def test_compose_env_is_settings(compose: dict) -> None:
    env_example = (COMPOSE.parent / ".env.example").read_text()
    names = {line.split("=")[0] for line in env_example.splitlines() if "=" in line and not line.startswith("#")}
    for name, service in compose["services"].items():
        for key in service.get("environment", {}):
            if key.startswith("TUNEGATE_"):
                assert tunegate_setting(key), f"{name}: {key} is no tunegate setting"
    assert {"TUNEGATE_SECRET_KEY", "POSTGRES_PASSWORD"} <= names
    load_settings(COMPOSE.parent / "tunegate.yaml")


# --- kubernetes -----------------------------------------------------------------------------------------

KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/prod"]


def rendered(path: str, engine: str = "auto") -> list[dict]:
    return [d for d in yaml.safe_load_all(render.render(K8S / path, engine)) if d]


def find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_k8s_schema(path: str, tmp_path: Path) -> None:
    out = tmp_path / "all.yaml"
    out.write_text(render.render(K8S / path))
    result = subprocess.run(
        [BIN / "kubernetes-validate", "--strict", "--quiet", "-k", K8S_VERSION, out], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_jobs_schema() -> None:
    jobs = sorted((K8S / "jobs").glob("*.yaml"))
    result = subprocess.run(
        [BIN / "kubernetes-validate", "--strict", "--quiet", "-k", K8S_VERSION, *jobs], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    fsdp = yaml.safe_load((K8S / "jobs" / "train-fsdp.yaml").read_text())
    command = fsdp["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["accelerate", "launch"]
    assert (
        "--config_file=/app/deploy/accelerate/fsdp.yaml" in command and (DEPLOY / "accelerate" / "fsdp.yaml").exists()
    )
    processes = int(next(a for a in command if a.startswith("--num_processes=")).split("=")[1])
    gpus = int(fsdp["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert processes == gpus


@pytest.mark.skipif(not shutil.which("kubectl") and not shutil.which("kustomize"), reason="no kustomize installed")
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_internal_renderer_matches_kustomize(path: str) -> None:
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    engine = "kustomize" if shutil.which("kustomize") else "kubectl"
    assert sorted(rendered(path, "internal"), key=key) == sorted(rendered(path, engine), key=key)


def container_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_k8s_gateway_probes_hpa_pdb(path: str) -> None:
    docs = rendered(path)
    gateway = find(docs, "Deployment", "tunegate-gateway")
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    settings = yaml.safe_load(find(docs, "ConfigMap", "tunegate-config")["data"]["tunegate.yaml"])
    port = settings["gateway"]["port"]
    assert "--port" in container["command"] and container["command"][container["command"].index("--port") + 1] == str(
        port
    )
    assert container_port(container, container["readinessProbe"]["httpGet"]["port"]) == port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container_port(container, container["livenessProbe"]["httpGet"]["port"]) == port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"

    hpa = find(docs, "HorizontalPodAutoscaler", "tunegate-gateway")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "tunegate-gateway")
    assert hpa["spec"]["minReplicas"] <= gateway["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]

    pdb = find(docs, "PodDisruptionBudget", "tunegate-gateway")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert gateway["spec"]["selector"]["matchLabels"] == pdb["spec"]["selector"]["matchLabels"]
    if "minAvailable" in pdb["spec"]:
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the budget would block every drain"


def test_k8s_prod_is_bigger_than_dev() -> None:
    dev, prod = rendered("overlays/dev"), rendered("overlays/prod")
    replicas = lambda docs: find(docs, "Deployment", "tunegate-gateway")["spec"]["replicas"]  # noqa: E731
    assert replicas(prod) > replicas(dev)
    worker = find(prod, "Deployment", "tunegate-worker")["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {d["metadata"].get("namespace") for d in prod if d["kind"] != "Namespace"} == {"tunegate"}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_k8s_vllm_gpu_lora_and_volume(path: str) -> None:
    docs = rendered(path)
    vllm = find(docs, "Deployment", "tunegate-vllm")
    pod = vllm["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in container["env"]
    args = dict(a.split("=", 1) if "=" in a else (a, "") for a in container["args"])
    settings = load_settings_text(find(docs, "ConfigMap", "tunegate-config")["data"]["tunegate.yaml"])
    assert "--enable-lora" in args
    assert int(args["--max-loras"]) == settings.vllm.max_loras
    assert int(args["--max-lora-rank"]) == settings.vllm.max_lora_rank
    assert args["--model"] == str(settings.base_model.path)
    assert args["--served-model-name"] == settings.base_model.served_name

    pvc = find(docs, "PersistentVolumeClaim", "tunegate-var")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    jobs = [yaml.safe_load(p.read_text()) for p in sorted((K8S / "jobs").glob("*.yaml"))]
    pods = [
        pod,
        *(find(docs, "Deployment", n)["spec"]["template"]["spec"] for n in ("tunegate-worker", "tunegate-gateway")),
    ]
    for spec in pods + [j["spec"]["template"]["spec"] for j in jobs]:
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"tunegate-var"}
        mounts = {m["mountPath"] for c in spec["containers"] for m in c["volumeMounts"]}
        assert str(settings.var_dir) in mounts


def load_settings_text(text: str) -> Settings:
    """The ConfigMap's tunegate.yaml as settings (production refuses the default secret key, so one is given)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tunegate.yaml"
        path.write_text(text)
        return load_settings(path, secret_key="a-secret-from-tunegate-secrets")


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_k8s_env_secrets_and_config(path: str) -> None:
    docs = rendered(path)
    secret = find(docs, "Secret", "tunegate-secrets")
    assert {"secret-key", "database-url", "redis-url"} <= set(secret["stringData"])
    load_settings_text(find(docs, "ConfigMap", "tunegate-config")["data"]["tunegate.yaml"])
    jobs = [yaml.safe_load(p.read_text()) for p in sorted((K8S / "jobs").glob("*.yaml"))]
    seen = set()
    for doc in [d for d in docs if d["kind"] in ("Deployment", "Job")] + jobs:
        spec = doc["spec"]["template"]["spec"]
        for container in spec["containers"] + spec.get("initContainers", []):
            for env in container.get("env", []):
                seen.add(env["name"])
                assert (
                    env["name"].startswith("VLLM_") or env["name"].startswith("HF_") or tunegate_setting(env["name"])
                ), f"{doc['metadata']['name']}: {env['name']} is no tunegate setting"
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "tunegate-secrets" and ref["key"] in secret["stringData"]
    assert {"TUNEGATE_SECRET_KEY", "TUNEGATE_DATABASE__URL", "TUNEGATE_GATEWAY__REDIS_URL"} <= seen


# --- make check-deploy ----------------------------------------------------------------------------------


def test_make_check_deploy_passes() -> None:
    result = subprocess.run(["make", "--no-print-directory", "check-deploy"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "check-deploy: all checks passed" in result.stdout


def run_check(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", CHECK], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PY": sys.executable, **env}
    )


def test_check_deploy_fails_on_a_broken_k8s_manifest(tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    gateway = copy / "base" / "gateway.yaml"
    gateway.write_text(gateway.read_text().replace("containerPort: 8000", "containerPort: eight-thousand"))
    result = run_check(K8S_DIR=str(copy))
    assert result.returncode != 0
    assert "FAILED" in result.stderr and "kubernetes-validate" in result.stderr


def test_check_deploy_fails_on_a_broken_compose_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:\n", "    health_check:\n", 1))
    result = run_check(COMPOSE_FILE=str(broken))
    assert result.returncode != 0
    assert "check-jsonschema" in result.stderr
