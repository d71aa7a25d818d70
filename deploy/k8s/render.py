"""Render a kustomization (deploy/k8s/base or an overlay) to stdout as a YAML stream.

    python deploy/k8s/render.py deploy/k8s/overlays/prod [--engine auto|kustomize|kubectl|internal]

`auto` uses a `kustomize` binary, else `kubectl kustomize`, else the small renderer below. The internal
renderer exists only for machines without either (a fresh one: no Debian package ships a kustomize
recent enough); it covers exactly the features these kustomizations use: `resources` (files and
directories), `namespace`, `labels` (metadata only), `images` and `patches` (strategic merge by
kind and name: maps merge, `null` deletes, lists of named items merge by name, other lists replace).
The tests check that it renders what `kubectl kustomize` renders wherever kubectl is installed.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
KNOWN_KEYS = {"apiVersion", "kind", "namespace", "resources", "labels", "images", "patches"}


def _merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        out = [dict(i) for i in base]
        for item in patch:
            at = next((n for n, b in enumerate(out) if b["name"] == item["name"]), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = _merge(out[at], item)
        return out
    return copy.deepcopy(patch)


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _set_image(container: dict, images: list[dict]) -> None:
    ref = container.get("image", "")
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
    for image in images:
        if image["name"] == name:
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"


def render_internal(directory: Path) -> list[dict]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - KNOWN_KEYS
    if unknown:
        raise SystemExit(f"{directory}: the internal renderer does not support {sorted(unknown)}; install kustomize")
    docs: list[dict] = []
    for entry in kust.get("resources", []):
        path = directory / entry
        docs += render_internal(path) if path.is_dir() else _load(path)
    for patch in kust.get("patches", []):
        if set(patch) != {"path"}:
            raise SystemExit(f"{directory}: only `patches: [{{path: ...}}]` is supported internally")
        for p in _load(directory / patch["path"]):
            at = next(
                n
                for n, d in enumerate(docs)
                if (d["kind"], d["metadata"]["name"]) == (p["kind"], p["metadata"]["name"])
            )
            docs[at] = _merge(docs[at], p)
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if "namespace" in kust and doc["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = kust["namespace"]
        for label in kust.get("labels", []):
            meta.setdefault("labels", {}).update(label["pairs"])
        if kust.get("images"):
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                _set_image(container, kust["images"])
    return docs


def render(directory: Path, engine: str = "auto") -> str:
    if engine == "auto":
        engine = "kustomize" if shutil.which("kustomize") else "kubectl" if shutil.which("kubectl") else "internal"
    if engine == "internal":
        return yaml.safe_dump_all(render_internal(directory), sort_keys=True)
    command = (
        ["kustomize", "build", str(directory)] if engine == "kustomize" else ["kubectl", "kustomize", str(directory)]
    )
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--engine", choices=["auto", "kustomize", "kubectl", "internal"], default="auto")
    args = parser.parse_args()
    try:
        sys.stdout.write(render(args.directory, args.engine))
    except subprocess.CalledProcessError as error:
        sys.stderr.write(error.stderr)
        raise SystemExit(f"rendering {args.directory} failed") from None


if __name__ == "__main__":
    main()
