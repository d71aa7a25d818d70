"""Typed settings for every tunegate process, read from `tunegate.yaml` and `TUNEGATE_*` variables.

Precedence (highest first): environment variables (`TUNEGATE_DATABASE__URL`, nested fields
joined by `__`), then the YAML file together with keyword overrides given to `load_settings`
(overrides replace the file's top-level values), then the defaults below.
The file is `tunegate.yaml` in the working directory unless `TUNEGATE_CONFIG` names another.

A bad value never reaches the code that uses it: `load_settings` raises `SettingsError`, whose
message names the field, the value and where it came from; the CLI prints it and exits 2.

Secrets never leave in what is printed (`tunegate settings show`, `redacted()`), in an error
message or in a repr: a field typed `SecretStr` or declared `_SECRET` shows as `***`; a field
declared `_SECRET_URL` (a webhook, whose path is often the credential) keeps only its scheme, user
and host; and every other string keeps its URLs with their passwords and secret query values
masked (`mask_url`). A key that is not a setting but is named like a secret (`secret_kye`) is masked
too. `secret_kind(loc)` says how a field at a location is treated.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from core.guard_settings import GuardrailSettings, PolicySettings
from core.loop_settings import LoopSettings

ENV_PREFIX = "TUNEGATE_"
CONFIG_ENV = "TUNEGATE_CONFIG"
DEFAULT_CONFIG_FILE = "tunegate.yaml"
DEFAULT_SECRET = "dev-only-change-me"
MASK = "***"

# How a secret field is masked (see the module's docstring): the whole value, or all of a URL but its
# scheme, user and host. Declared with `json_schema_extra`; such fields also stay out of the repr.
_SECRET: dict[str, Any] = {"secret": "value"}
_SECRET_URL: dict[str, Any] = {"secret": "url"}
# A key that is not a setting is treated as a secret when its name looks like one (a typo of one).
_SECRET_NAME = re.compile(
    r"(?:^|_)(?:secrets?|password|passwd|pwd|token|api_?key|credentials?|private_key)(?:_|$)", re.I
)
# Query parameters whose value is masked in any URL shown (`?api-key=...`, `?token=...`, `?sig=...`).
_SECRET_QUERY = re.compile(r"key|token|secret|pass|sig|auth|credential", re.I)
# A URL inside a string (starts only where a scheme can start, so the search is linear).
_URL_RE = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


class SettingsError(Exception):
    """Settings could not be loaded; the message is meant for a person, verbatim."""


class _Section(BaseModel):
    # A typo in the YAML file (`databse:`) must fail loudly, not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class DatabaseSettings(_Section):
    url: str = Field(
        "", repr=False, description="SQLAlchemy URL; empty means SQLite at `<var_dir>/tunegate.db` (password masked)."
    )
    echo: bool = Field(False, description="Log every SQL statement.")

    @field_validator("url")
    @classmethod
    def _known_backend(cls, url: str) -> str:
        if url and not url.startswith(("sqlite", "postgresql")):
            raise ValueError("only sqlite:/// and postgresql+psycopg:// URLs are supported")
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            # psycopg 3 is the installed driver; plain postgresql:// would look for psycopg2.
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return url


class VllmSettings(_Section):
    url: str | None = Field(None, repr=False, description="Use this running vLLM server instead of starting one.")
    host: str = Field("127.0.0.1", description="Address the managed vLLM server binds to.")
    port: int = Field(8100, ge=1, le=65535, description="Port of the managed vLLM server.")
    max_loras: int = Field(8, ge=1, description="Adapters resident in one batch (`--max-loras`).")
    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank the server accepts.")
    max_model_len: int = Field(512, ge=16, description="Context length the server allocates for.")
    kvcache_space_gib: int = Field(1, ge=1, description="`VLLM_CPU_KVCACHE_SPACE` (whole GiB) on CPU builds.")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="Fraction of accelerator memory.")
    startup_timeout_s: float = Field(240.0, gt=0, description="How long to wait for the server to be ready.")
    extra_args: list[str] = Field(default_factory=list, description="More arguments for the server.")


class BaseModelSettings(_Section):
    path: Path | None = Field(
        None, description="A Hugging Face model folder to serve; empty means the embedded bootstrap model."
    )
    served_name: str = Field("base", description="Name of the base model in `/v1/models`.")


class RouteTarget(_Section):
    adapter: str | None = Field(None, description="Registry name of the adapter; empty means the base model.")
    version: str = Field("latest", description="`v3`, or `latest` (the newest servable version).")
    weight: float = Field(1.0, ge=0, description="Share of traffic, relative to the route's other targets.")

    @field_validator("version")
    @classmethod
    def _version_shape(cls, version: str) -> str:
        if version != "latest" and not (version.startswith("v") and version[1:].isdigit()):
            raise ValueError("use `latest` or a registry version such as `v3`")
        return version


class ReviewSettings(_Section):
    sample_rate: float = Field(0.02, ge=0, le=1, description="Share of allowed answers also sent to review.")
    lease_s: float = Field(300.0, gt=0, description="How long a claimed item stays with its reviewer.")
    required_verdicts: int = Field(1, ge=1, description="Independent verdicts an item needs (overlap).")
    max_leases_per_reviewer: int = Field(5, ge=1, description="Items one reviewer may hold at once (409 beyond).")
    hold_timeout_s: float = Field(3600.0, gt=0, description="How long a held answer waits for a verdict.")
    hold_fallback: Literal["refuse", "release"] = Field(
        "refuse", description="What a held answer becomes when nobody decided in time."
    )
    webhook_url: str | None = Field(
        None,
        repr=False,
        json_schema_extra=_SECRET_URL,
        description="POSTed the outcome of each held item (a secret but for its scheme, user and host).",
    )


class RouteSettings(_Section):
    """A public model name (an alias) and the adapter versions it splits traffic between."""

    targets: list[RouteTarget] = Field(min_length=1, description="Where the alias sends traffic.")
    description: str = Field("", description="Shown in `/v1/models`.")
    policy: PolicySettings | None = Field(None, description="This route's risk thresholds (default: guardrails').")
    knowledge_base: Path | None = Field(
        None, description="JSONL of passages (`text` field) to ground answers in when the client sends no context."
    )

    @model_validator(mode="after")
    def _some_weight(self) -> RouteSettings:
        if sum(t.weight for t in self.targets) <= 0:
            raise ValueError("the weights of `targets` add up to 0; give at least one target a weight > 0")
        return self


class LimitSettings(_Section):
    """What one request may ask of the gateway; past a limit it is refused (400, or 413 for sizes) before any
    work is done on it."""

    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body, counted while it is read (chunked too): 413 past it."
    )
    max_messages: int = Field(256, ge=1, description="Most `messages` in one chat request.")
    max_model_chars: int = Field(256, ge=1, description="Longest `model` name a client may send.")
    max_user_header_chars: int = Field(256, ge=1, description="Longest `X-TuneGate-User` header.")
    max_context_chars: int = Field(
        200_000, ge=1, description="Longest grounding text (`context` or `documents`, all of it): 413 past it."
    )
    max_context_sentences: int = Field(
        2_000, ge=1, description="Most sentences in the grounding text (the guard scores each one)."
    )
    max_documents: int = Field(64, ge=1, description="Most items in `documents` (or a `context` list).")


class GatewaySettings(_Section):
    host: str = Field("127.0.0.1", description="Address the gateway binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the gateway.")
    workers: int = Field(1, ge=1, description="uvicorn worker processes.")
    connect_timeout_s: float = Field(3.0, gt=0, description="Time to connect to vLLM.")
    upstream_timeout_s: float = Field(300.0, gt=0, description="Time for vLLM to answer (or to send the next byte).")
    connect_retries: int = Field(2, ge=0, description="Retries when vLLM refuses the connection (never after a byte).")
    breaker_failures: int = Field(5, ge=1, description="Consecutive upstream failures that open the circuit.")
    breaker_reset_s: float = Field(5.0, gt=0, description="How long an open circuit fails fast before a probe.")
    requests_per_minute: int | None = Field(
        600, ge=1, description="Default per-key request limit (per replica, or for all of them with `redis_url`)."
    )
    tokens_per_minute: int | None = Field(
        200_000, ge=1, description="Default per-key token limit (per replica, or for all of them with `redis_url`)."
    )
    redis_url: str | None = Field(
        None,
        repr=False,
        description="Redis that shares the per-key limits between replicas (`redis://[:password@]host:6379/0`); "
        "empty: each replica limits on its own (password masked).",
    )
    log_batch_size: int = Field(200, ge=1, description="Traffic-log rows written per database round trip.")
    log_flush_interval_s: float = Field(0.2, gt=0, description="Longest a traffic-log row waits to be written.")
    log_queue_max: int = Field(
        10_000,
        ge=1,
        description="Traffic-log rows queued in memory; more spill to `<var_dir>/traffic-<owner>.spill.jsonl`.",
    )
    log_close_timeout_s: float = Field(
        10.0, gt=0, description="Longest shutdown waits to write the traffic log; what is left spills to disk."
    )
    store_text: bool = Field(True, description="Store prompts and answers in the traffic log.")
    mask_pii: bool = Field(False, description="Mask e-mails, phone and card numbers, ids in stored text.")
    retention_days: int | None = Field(None, ge=1, description="Delete traffic-log rows older than this.")
    max_loaded_adapters: int = Field(8, ge=1, description="Adapters kept loaded in vLLM (least recently used go).")
    background_tasks: bool = Field(True, description="Run the loop's background work (retention, jobs).")
    metrics_public: bool = Field(True, description="Serve `/metrics` without a key (for Prometheus).")
    key_cache_s: float = Field(5.0, ge=0, description="How long a key lookup is cached (revocation delay).")
    key_cache_size: int = Field(10_000, ge=1, description="Most known keys cached (least recently used go).")
    key_negative_cache_s: float = Field(
        1.0, ge=0, description="How long an unknown key's miss is cached (at most `key_cache_s`)."
    )
    key_negative_cache_size: int = Field(1_000, ge=1, description="Most unknown keys cached (oldest go).")
    limits: LimitSettings = Field(default_factory=LimitSettings, description="What one request may ask.")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("use a redis://, rediss:// or unix:// URL")
        return url or None


class Settings(BaseSettings):
    """Everything a tunegate process can be told. Sections mirror the packages that read them."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    environment: Literal["development", "production"] = Field(
        "development", description="`production` refuses default secrets."
    )
    var_dir: Path = Field(Path("var"), description="Where tunegate keeps its database, models and runs.")
    secret_key: SecretStr = Field(
        SecretStr(DEFAULT_SECRET), description="Signs reviewer sessions; 8 characters or more (a secret)."
    )
    seed: int = Field(0, description="Seed for everything tunegate generates itself.")
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    base_model: BaseModelSettings = Field(default_factory=BaseModelSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    guardrails: GuardrailSettings = Field(default_factory=GuardrailSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    loop: LoopSettings = Field(default_factory=LoopSettings)
    routes: dict[str, RouteSettings] = Field(
        default_factory=dict, description="Public model names (aliases) and their adapter targets."
    )

    config_file: Path | None = Field(None, exclude=True, description="The YAML file these came from.")

    @field_validator("secret_key")
    @classmethod
    def _long_enough(cls, secret: SecretStr) -> SecretStr:
        if len(secret.get_secret_value()) < 8:
            raise ValueError("must have at least 8 characters")
        return secret

    @model_validator(mode="after")
    def _no_default_secrets_in_production(self) -> Settings:
        if self.environment == "production" and self.secret_key.get_secret_value() == DEFAULT_SECRET:
            raise ValueError(
                "`secret_key` still has its development default; set TUNEGATE_SECRET_KEY "
                "before running with environment=production"
            )
        return self

    @model_validator(mode="after")
    def _grounding_model_under_var_dir(self) -> Settings:  # where `tunegate guard train-detector` points
        guardrails = self.guardrails
        guardrails.grounding_model_path = guardrails.grounding_model_path or self.models_dir / "grounding-current"
        return self

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.var_dir / 'tunegate.db').as_posix()}"

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON data with every secret masked (what `tunegate settings show` prints);
        `database.url` is the effective one."""
        data = redact(self.model_dump(mode="json"))
        data["database"]["url"] = mask_url(self.database_url)
        return data

    @property
    def models_dir(self) -> Path:
        return self.var_dir / "models"

    @property
    def adapters_dir(self) -> Path:
        """The adapter registry: `<adapters_dir>/<name>/<version>/`."""
        return self.var_dir / "adapters"

    @model_validator(mode="after")
    def _routes_do_not_shadow_the_base(self) -> Settings:
        if self.base_model.served_name in self.routes:
            raise ValueError(f"`routes.{self.base_model.served_name}` has the base model's name; rename the route")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file is passed in as init data by `load_settings`, below env vars in rank.
        return env_settings, init_settings


def _declared_secret(info: FieldInfo) -> str | None:
    if info.annotation is SecretStr:
        return _SECRET["secret"]
    extra = info.json_schema_extra
    return extra.get("secret") if isinstance(extra, dict) else None  # type: ignore[return-value]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, get_args(annotation)) if m is not None), None)


def _is_container(annotation: Any) -> bool:
    return get_origin(annotation) in (dict, list) or any(get_origin(a) in (dict, list) for a in get_args(annotation))


def secret_kind(loc: tuple[Any, ...]) -> str | None:
    """`"value"` (shown as `***`), `"url"` (a URL shown without password, path and query) or None for
    the setting at `loc` (e.g. `("guardrails", "judge_api_key")`), or for anything inside it. A key
    that is no setting counts as a secret when its name looks like one."""
    model: type[BaseModel] | None = Settings
    item = False  # the next key is a dict key or list index of the field just crossed
    for key in loc:
        if item:
            item = False
            continue
        if model is None or key not in model.model_fields:
            return _SECRET["secret"] if isinstance(key, str) and _SECRET_NAME.search(key) else None
        info = model.model_fields[key]
        if kind := _declared_secret(info):
            return kind
        model, item = _model_in(info.annotation), _is_container(info.annotation)
    return None


def _mask_one_url(url: str, hide_path: bool) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    user, at, host = netloc.rpartition("@")
    if at and ":" in user:
        netloc = f"{user.split(':', 1)[0]}:{MASK}@{host}"
    if hide_path:
        tail = f"/{MASK}" if parts.path.strip("/") or parts.query else ""
        return f"{parts.scheme}://{netloc}{tail}"
    query = "&".join(
        f"{name}={MASK}" if sep and _SECRET_QUERY.search(name) else f"{name}{sep}{value}"
        for name, sep, value in (p.partition("=") for p in parts.query.split("&"))
    )
    rest = url[len(parts.scheme) + 3 + len(parts.netloc) :]  # path, query, fragment as written
    if parts.query:
        start = rest.index("?") + 1
        rest = rest[:start] + query + rest[start + len(parts.query) :]
    return f"{parts.scheme}://{netloc}{rest}"


def mask_url(text: str, hide_path: bool = False) -> str:
    """`text` with the password and the secret query values (`key`, `token`, `sig`, ...) of every URL in
    it masked; with `hide_path`, each URL keeps only its scheme, user and host (a webhook's path is
    often its credential). `postgresql://u:p@h/db` -> `postgresql://u:***@h/db`."""
    return _URL_RE.sub(lambda m: _mask_one_url(m.group(0), hide_path), text)


def redact(value: Any, loc: tuple[Any, ...] = ()) -> Any:
    """`value` (settings data found at `loc`, as in a YAML file) with every secret in it masked."""
    kind = secret_kind(loc) if loc else None
    if kind == "value" and value not in (None, ""):
        return MASK
    if isinstance(value, dict):
        return {k: redact(v, (*loc, k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, (*loc, i)) for i, v in enumerate(value)]
    if isinstance(value, str):
        return mask_url(value, hide_path=kind == "url")
    return value


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_FILE))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """Where and what the YAML error is, without `str(err)`'s quote of the offending line (a secret?)."""

    def at(mark: Any) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""

    problem = getattr(err, "problem", None) or type(err).__name__
    context = getattr(err, "context", None)
    context = f" ({context}{at(getattr(err, 'context_mark', None))})" if context else ""
    return f"{at(getattr(err, 'problem_mark', None))}: {problem}{context}"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SettingsError(f"{path}: not valid YAML{_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: the top level must be a mapping of setting names to values")
    return data


def _lookup(data: dict[str, Any], loc: tuple[Any, ...]) -> tuple[bool, Any]:
    node: Any = data
    for key in loc:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _describe(err: dict[str, Any], file_data: dict[str, Any], path: Path | None) -> str:
    loc = tuple(err["loc"])
    field = ".".join(str(p) for p in loc) or "settings"
    env_name = ENV_PREFIX + "__".join(str(p) for p in loc).upper()
    if loc and env_name in os.environ:
        source, value = f"environment variable {env_name}", os.environ[env_name]
    else:
        found, value = _lookup(file_data, loc)
        source = str(path) if found and path else "defaults"
        if not found:
            value = err.get("input")
    value = redact(value, loc)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown setting (check the spelling; `tunegate settings show` lists them all)"
    if not loc:
        return f"{msg} (in {path or 'settings'})"
    return f"`{field}` = {value!r} in {source}: {msg}"


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read settings from the YAML file, the environment and `overrides`; raise `SettingsError`."""
    path = path or config_path()
    explicit = path != Path(DEFAULT_CONFIG_FILE) or CONFIG_ENV in os.environ
    if path.exists():
        file_data = _read_yaml(path)
    elif explicit:
        raise SettingsError(f"{path}: settings file not found (named by {CONFIG_ENV} or --config)")
    else:
        file_data, path = {}, None
    data = {**file_data, **overrides, "config_file": path}
    try:
        return Settings(**data)
    except ValidationError as exc:
        lines = [_describe(e, file_data, path) for e in exc.errors()]
        head = "invalid setting" if len(lines) == 1 else f"{len(lines)} invalid settings"
        raise SettingsError(f"{head}:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once on first use (never at import time)."""
    return load_settings()
