"""The adapter registry: trained adapters as versioned, immutable folders on the filesystem.

Owns `Manifest` (what an adapter is and where it came from), `AdapterRegistry` (atomic publish,
list, get, path, next_version, gc of interrupted publishes) and `check_servable()` (whether vLLM
can serve an adapter). Imports `core.io` (atomic JSON writes) and nothing else of ours.

Layout: `<root>/<name>/<version>/` holds the peft files (`adapter_config.json`,
`adapter_model.safetensors`, ...) and `manifest.json`, written last. Versions are `v1`, `v2`, ...
A publish copies into `<root>/<name>/.tmp-<uuid>/`, fsyncs, writes the manifest and renames the
folder to its version, so a version folder is either complete or absent; a crash leaves only a
`.tmp-*` folder, which `list()` ignores and `gc_tmp()` removes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.io import atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TMP_PREFIX = ".tmp-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")

# peft types vLLM cannot serve, with what they are called in messages.
_PROMPT_METHODS = {
    "PREFIX_TUNING": "prefix tuning",
    "P_TUNING": "p-tuning",
    "PROMPT_TUNING": "prompt tuning",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning",
    "ADAPTION_PROMPT": "adaption prompt (LLaMA-Adapter)",
    "CPT": "context-aware prompt tuning",
}


class RegistryError(Exception):
    """Base class of registry errors."""


class UnservableAdapterError(RegistryError):
    """The adapter cannot be served by vLLM; `reason` says why and how to fix it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class VersionExistsError(RegistryError, FileExistsError):
    """A version is immutable once published."""


class AdapterNotFoundError(RegistryError, LookupError):
    """No such adapter name or version."""


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def version_number(version: str) -> int:
    """`"v12"` -> 12; raises ValueError for anything that is not `v<N>`."""
    m = _VERSION_RE.match(version)
    if not m:
        raise ValueError(f"`version` must look like `v1`, `v2`, ..., got {version!r}; use `next_version(name)`.")
    return int(m.group(1))


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"`name` must be 1-128 letters, digits, `.`, `_` or `-`, starting with a letter or digit, "
            f"got {name!r}; pick a name such as `support`."
        )


@dataclass
class Manifest:
    """Provenance and servability of one adapter version; stored as `manifest.json` next to its files."""

    name: str
    version: str
    base_model: str
    base_model_hash: str
    dataset_hash: str
    config_hash: str
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    parent_version: str | None = None
    created_at: str = field(default_factory=_now_iso)
    peft_type: str = "LORA"
    servable: bool = True
    unservable_reason: str | None = None
    trainable_params: int = 0
    total_params: int = 0

    def __post_init__(self) -> None:
        _check_name(self.name)
        version_number(self.version)
        if self.parent_version is not None:
            version_number(self.parent_version)
        try:
            stamp = datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError):
            raise ValueError(
                f"`created_at` must be an ISO 8601 timestamp, got {self.created_at!r}; leave it unset to use now."
            ) from None
        if stamp.utcoffset() is None or stamp.utcoffset().total_seconds() != 0:
            raise ValueError(f"`created_at` must be in UTC (`+00:00`), got {self.created_at!r}.")
        if not isinstance(self.metrics, dict):
            raise ValueError(f"`metrics` must be a dict of metric name to value, got {type(self.metrics).__name__}.")
        if self.servable and self.unservable_reason:
            raise ValueError(
                "`unservable_reason` is set but `servable` is true; clear the reason or set servable=False."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"manifest has unknown fields {unknown}; known fields are {sorted(names)}.")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        required -= {f.name for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"manifest is missing required fields {missing}.")
        return cls(**data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to `path` (a file, or a folder to hold `manifest.json`) atomically, fsynced."""
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST
        atomic_write_json(p, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read from `path` (a `manifest.json` or the adapter folder holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST
        return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(adapter_dir) / ADAPTER_CONFIG
    if not p.is_file():
        raise FileNotFoundError(
            f"no `{ADAPTER_CONFIG}` in {str(adapter_dir)!r}; pass the folder written by peft's `save_pretrained`."
        )
    return json.loads(p.read_text(encoding="utf-8"))


def check_servable(
    adapter_dir: str | os.PathLike[str],
    base_model_hash: str | None,
    expected_base_hash: str | None,
    max_lora_rank: int,
) -> tuple[bool, str | None]:
    """Can vLLM serve the adapter in `adapter_dir` on the served base model? Returns (ok, reason).

    Reads `adapter_config.json` and applies vLLM's LoRA rules: LoRA only (no prefix/prompt tuning,
    IA3, ...), no DoRA, no `modules_to_save`, no trained biases, rank `r` (and every `rank_pattern`
    entry) at most `max_lora_rank`. `base_model_hash` (the adapter's base) must equal
    `expected_base_hash` (the served base) when the latter is given. All problems found are listed,
    separated by `; `.
    """
    try:
        cfg = read_adapter_config(adapter_dir)
    except (OSError, ValueError) as exc:
        return False, str(exc)
    reasons: list[str] = []
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        if peft_type in _PROMPT_METHODS:
            what = _PROMPT_METHODS[peft_type]
            reasons.append(
                f"vLLM serves only LoRA adapters; {what} (`peft_type` {peft_type}) adds virtual tokens and "
                "cannot be served: retrain with peft `LoraConfig`"
            )
        else:
            reasons.append(
                f"vLLM serves only LoRA adapters; `peft_type` is {peft_type or 'missing'}: "
                "retrain with peft `LoraConfig`"
            )
    else:
        if cfg.get("use_dora"):
            reasons.append(
                "`use_dora` is true: vLLM does not serve DoRA adapters; retrain with `use_dora=False` (plain LoRA)"
            )
        modules_to_save = cfg.get("modules_to_save")
        if modules_to_save:
            reasons.append(
                f"`modules_to_save` is {list(modules_to_save)}: vLLM loads only the LoRA matrices, not fully "
                "trained modules; retrain with `modules_to_save=None`"
            )
        bias = cfg.get("bias", "none")
        if bias not in (None, "none"):
            reasons.append(f"`bias` is {bias!r}: vLLM does not load trained biases; retrain with `bias='none'`")
        ranks = {"`r`": cfg.get("r")}
        ranks.update({f"`rank_pattern[{k!r}]`": v for k, v in (cfg.get("rank_pattern") or {}).items()})
        for what, r in ranks.items():
            if not isinstance(r, int) or r < 1:
                reasons.append(f"{what} is {r!r}, not a positive integer; the adapter config is damaged")
            elif r > max_lora_rank:
                reasons.append(
                    f"{what} is {r}, above the server's `max_lora_rank` {max_lora_rank}: retrain with "
                    f"`r<={max_lora_rank}` or raise `max_lora_rank` (vLLM `--max-lora-rank`)"
                )
    if expected_base_hash is not None and base_model_hash != expected_base_hash:
        reasons.append(
            f"`base_model_hash` {base_model_hash!r} does not match the served base model "
            f"{expected_base_hash!r}: an adapter only works on the weights it was trained on; "
            "retrain it on the served base model"
        )
    return (not reasons, "; ".join(reasons) or None)


class AdapterRegistry:
    """Adapters under `root`, one immutable folder per `<name>/<version>`.

    `max_lora_rank` is the serving limit (vLLM `--max-lora-rank`); `base_model_hash`, when given,
    is the hash of the served base model every published adapter must have been trained on.
    """

    def __init__(self, root: str | os.PathLike[str], max_lora_rank: int = 16, base_model_hash: str | None = None):
        if not isinstance(max_lora_rank, int) or max_lora_rank < 1:
            raise ValueError(
                f"`max_lora_rank` must be a positive integer, got {max_lora_rank!r}; "
                "use the value vLLM runs with (`--max-lora-rank`, default 16)."
            )
        self.root = Path(root)
        self.max_lora_rank = max_lora_rank
        self.base_model_hash = base_model_hash

    # ---------------------------------------------------------------------------------- reading

    def _versions(self, name: str) -> list[tuple[int, Path]]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        out = []
        for p in folder.iterdir():
            m = _VERSION_RE.match(p.name)
            if m and p.is_dir() and (p / MANIFEST).is_file():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.match(p.name))

    def list(self, name: str | None = None) -> list[Manifest]:
        """Manifests of every published version (of `name`, or of all adapters), oldest version first.

        Interrupted publishes (`.tmp-*` folders) are not versions and are never listed.
        """
        names = [name] if name is not None else self.names()
        out = []
        for n in names:
            _check_name(n)
            for _, path in self._versions(n):
                try:
                    out.append(Manifest.load(path))
                except (OSError, ValueError, TypeError) as exc:
                    log.warning("skipping %s: unreadable manifest (%s)", path, exc)
        return out

    def _resolve(self, name: str, version: str) -> Path:
        _check_name(name)
        versions = self._versions(name)
        if not versions:
            raise AdapterNotFoundError(f"no adapter named {name!r} in {str(self.root)!r}; known: {self.names()}.")
        if version == "latest":
            return versions[-1][1]
        wanted = version_number(version)
        for n, path in versions:
            if n == wanted:
                return path
        known = [p.name for _, p in versions]
        raise AdapterNotFoundError(f"adapter {name!r} has no version {version!r}; known versions: {known}.")

    def get(self, name: str, version: str = "latest") -> Manifest:
        """The manifest of `name` at `version` (`v<N>` or `latest`, the highest number)."""
        return Manifest.load(self._resolve(name, version))

    def path(self, name: str, version: str = "latest") -> Path:
        """The folder of `name` at `version`, ready for vLLM's `--lora-modules` / runtime loading."""
        return self._resolve(name, version)

    def next_version(self, name: str) -> str:
        _check_name(name)
        versions = self._versions(name)
        return f"v{versions[-1][0] + 1 if versions else 1}"

    # ---------------------------------------------------------------------------------- writing

    def publish(self, src_dir: str | os.PathLike[str], manifest: Manifest, allow_unservable: bool = False) -> Path:
        """Copy the adapter in `src_dir` into the registry as `manifest.name`/`manifest.version`, atomically.

        The stored manifest takes `peft_type`, `servable` and `unservable_reason` from `check_servable`.
        An unservable adapter raises `UnservableAdapterError` unless `allow_unservable` is true, in
        which case it is stored with `servable=False` and the reason (for analysis, never for serving).
        A version that exists raises `VersionExistsError`. Returns the version folder.
        """
        src = Path(src_dir)
        cfg = read_adapter_config(src)
        if not any((src / w).is_file() for w in ADAPTER_WEIGHTS):
            raise FileNotFoundError(
                f"no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}) in {str(src)!r}; "
                "pass the folder written by peft's `save_pretrained`."
            )
        ok, reason = check_servable(src, manifest.base_model_hash, self.base_model_hash, self.max_lora_rank)
        if not ok and not allow_unservable:
            raise UnservableAdapterError(
                f"adapter {manifest.name!r} {manifest.version} cannot be served: {reason}. "
                "Pass `allow_unservable=True` to register it anyway (it will never be routed to)."
            )
        stored = dataclasses.replace(
            manifest, peft_type=str(cfg.get("peft_type", "")).upper(), servable=ok, unservable_reason=reason
        )

        parent = self.root / stored.name
        final = parent / stored.version
        if final.exists():
            raise self._exists(stored)
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for file in sorted(src.rglob("*")):
                rel = file.relative_to(src)
                if rel == Path(MANIFEST) or not file.is_file():
                    continue
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, dest)
                _fsync_path(dest)
            stored.save(tmp / MANIFEST)  # written last: a folder with a manifest is complete
            for d in sorted({p for p in tmp.rglob("*") if p.is_dir()} | {tmp}, reverse=True):
                _fsync_path(d)
            try:
                os.rename(tmp, final)  # fails if `final` appeared meanwhile (not an empty dir)
            except OSError as exc:
                if final.exists():
                    raise self._exists(stored) from exc
                raise
            _fsync_path(parent)
        except Exception:
            # An ordinary error cleans up; a hard crash (kill, power loss) leaves the tmp folder for gc_tmp().
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("published adapter %s %s (servable=%s)", stored.name, stored.version, ok)
        return final

    def _exists(self, manifest: Manifest) -> VersionExistsError:
        return VersionExistsError(
            f"adapter {manifest.name!r} version {manifest.version} already exists and versions are "
            f"immutable; publish as `{self.next_version(manifest.name)}` (see `next_version`)."
        )

    def gc_tmp(self, min_age_s: float = 3600.0) -> list[Path]:
        """Remove `.tmp-*` folders left by interrupted publishes that are at least `min_age_s` old.

        The age guard keeps a concurrent publish in another process safe; pass 0 to remove all.
        Returns the removed folders.
        """
        removed: list[Path] = []
        now = time.time()
        for name in self.names():
            for p in (self.root / name).glob(f"{TMP_PREFIX}*"):
                if p.is_dir() and now - p.stat().st_mtime >= min_age_s:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return sorted(removed)
