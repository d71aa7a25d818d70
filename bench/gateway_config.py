"""Gateway overhead, the settings: `GatewayBenchConfig` and the command line built from it.

One source of truth: every setting is a field of the dataclass, with its default and its help in
the field (`metadata={"help": ...}`), checked in `__post_init__` (an error names the field in
backticks and says the fix). `build_parser` derives the argparse flags from the fields: a field
`quiet_wait` is `--quiet-wait`, a bool `plot` is `--plot/--no-plot`, a tuple is comma-separated
(`--rates 25,50`) unless its metadata says `"cli": "json"` (a JSON list: `--ours-cmd '["a","b"]'`)
or `"cli": "append"` (repeat the flag). `to_argv`/`from_argv` and `to_dict`/`GatewayBenchConfig(**d)`
go both ways, so a config survives the trip through a command line or a JSON file unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "out" / "gateway"
DEFAULT_RATES = (25.0, 50.0, 100.0, 200.0, 400.0)
ALL_TARGETS = ("direct", "litellm", "ours")
MODEL = "mock"


def _help(text: str, **extra: str) -> dict[str, str]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class GatewayBenchConfig:
    """What `python -m bench.gateway_overhead` measures, and how (every flag of its command line)."""

    targets: tuple[str, ...] = field(
        default=ALL_TARGETS, metadata=_help("what to measure, in this order: direct (the baseline), litellm, ours")
    )
    rates: tuple[float, ...] = field(default=DEFAULT_RATES, metadata=_help("offered loads, requests/s"))
    duration: float = field(default=8.0, metadata=_help("seconds of load per rate"))
    delay_ms: float = field(default=50.0, metadata=_help("the mock upstream's fixed delay (ms)"))
    out: Path = field(default=DEFAULT_OUT, metadata=_help("folder for gateway_overhead.json and .png"))
    litellm_bin: str | None = field(
        default=None, metadata=_help("the `litellm` CLI (default: $LITELLM_BIN, .venv-litellm, .venv, PATH)")
    )
    litellm_workers: int = field(default=2, metadata=_help("LiteLLM --num_workers (one per core)"))
    ours_cmd: tuple[str, ...] | None = field(
        default=None,
        metadata=_help(
            "the command that starts tunegate's gateway, {MOCK_URL}, {PORT} and {HOST} filled in "
            "(default: tunegate serve --vllm-url {MOCK_URL} --port {PORT} --no-workers)",
            cli="json",
        ),
    )
    ours_key_cmd: tuple[str, ...] | None = field(
        default=None,
        metadata=_help(
            "the command that prints a JSON object with the gateway's `key` "
            "(default: tunegate keys create bench --role app --json)",
            cli="json",
        ),
    )
    ours_env: tuple[str, ...] = field(
        default=(), metadata=_help("NAME=VALUE for tunegate's gateway, over the benchmark's own", cli="append")
    )
    ours_workers: int = field(default=2, metadata=_help("TUNEGATE_GATEWAY__WORKERS (0: leave unset)"))
    ours_model: str | None = field(
        default=None, metadata=_help("model name to ask tunegate for (default: the first of its /v1/models)")
    )
    ours_migrate: bool = field(default=True, metadata=_help("run `tunegate db upgrade` before starting tunegate"))
    mock_workers: int = field(default=2, metadata=_help("uvicorn workers of the mock upstream"))
    model: str = field(default=MODEL, metadata=_help("model name the mock serves and direct and litellm ask for"))
    hey: str = field(default="hey", metadata=_help("the load generator: Debian's `hey`, a name on PATH or a path"))
    hey_procs: int = field(
        default=1,
        metadata=_help("spread each rate's workers over N hey processes started 1/(qps*N) s apart (smaller bursts)"),
    )
    warmup: float = field(default=2.0, metadata=_help("unmeasured seconds of load per target (0: none)"))
    pause: float = field(default=1.0, metadata=_help("seconds of rest between two rates"))
    start_timeout: float = field(default=120.0, metadata=_help("seconds a proxy may take to answer after its start"))
    quiet_wait: float = field(
        default=0.0, metadata=_help("before each rate, wait up to this many seconds for other processes to go quiet")
    )
    quiet_cores: float = field(default=0.25, metadata=_help("'quiet': other processes use fewer cores than this"))
    plot: bool = field(default=True, metadata=_help("draw gateway_overhead.png"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"`targets` has unknown targets {unknown} or none; choose from {', '.join(ALL_TARGETS)}")
        if not self.rates or min(self.rates) <= 0:
            raise ValueError(f"`rates` {list(self.rates)} must be requests/s above 0, e.g. --rates 25,50,100")
        object.__setattr__(self, "rates", tuple(sorted(self.rates)))
        for name in ("duration", "start_timeout", "quiet_cores"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` is {getattr(self, name)}; it must be above 0 (default {_default(name)})")
        for name in ("delay_ms", "warmup", "pause", "quiet_wait", "ours_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` is {getattr(self, name)}; it must be 0 or more (default {_default(name)})")
        for name in ("litellm_workers", "mock_workers", "hey_procs"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` is {getattr(self, name)}; it must be at least 1 (default {_default(name)})")
        for name in ("ours_cmd", "ours_key_cmd"):
            if getattr(self, name) == ():
                raise ValueError(f"`{name}` is an empty command; leave it unset for the default, or name a program")
        for item in self.ours_env:
            if not item.partition("=")[0]:
                raise ValueError(f"`ours_env` item {item!r} is not NAME=VALUE; write e.g. TUNEGATE_LOG_LEVEL=warning")
        if not self.hey or not self.model:
            raise ValueError("`hey` and `model` must not be empty; leave them out for the defaults")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (tuples as lists, paths as strings); `GatewayBenchConfig(**d)`
        reads them back (an unknown key is a TypeError naming it)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_argv(self) -> list[str]:
        """The command line that `from_argv` reads back as this config (defaults left out)."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default or value is None:
                continue
            flag, kind = _flag(f.name), _kind(f)
            if kind == "bool":
                argv.append(flag if value else "--no-" + flag[2:])
            elif kind == "append":
                argv += [part for item in value for part in (flag, _text(item))]
            else:
                argv += [flag, _text(value, kind)]
        return argv

    @classmethod
    def from_argv(cls, argv: Sequence[str] | None = None, description: str | None = None) -> GatewayBenchConfig:
        """Parse a command line; a bad flag or setting exits with argparse's usage message (status 2)."""
        parser = build_parser(description)
        namespace = parser.parse_args(argv)
        try:
            return cls(**vars(namespace))
        except ValueError as e:
            parser.error(str(e))  # exits


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of `GatewayBenchConfig`: one flag a field, its help and default from the
    field. Flags not given are left out of the namespace, so the dataclass supplies the defaults."""
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(GatewayBenchConfig):
        kind, element = _kind(f), _element_type(f)
        text = f.metadata["help"]
        if "(default:" not in text:  # a help that explains its own default says it best
            text += f" (default: {_text(f.default, kind) or 'none'})"
        text = text.replace("%", "%%")  # argparse formats help with %
        if kind == "bool":
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, help=text)
        elif kind == "append":
            parser.add_argument(_flag(f.name), action="append", type=element, metavar=f.name.upper(), help=text)
        elif kind == "json":
            parser.add_argument(_flag(f.name), type=_json_list, metavar="JSON_LIST", help=text)
        elif kind == "csv":
            parser.add_argument(_flag(f.name), type=_csv_of(element), metavar="A,B,...", help=text)
        else:
            parser.add_argument(_flag(f.name), type=element, metavar=f.name.upper(), help=text)
    return parser


# ----------------------------------------------------------------------------------------------
# How a field's type becomes a flag, and back
# ----------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(name: str) -> Any:
    return GatewayBenchConfig.__dataclass_fields__[name].default


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(GatewayBenchConfig)


def _type(f: dataclasses.Field) -> Any:
    """The field's type without `| None`."""
    tp = _hints()[f.name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _kind(f: dataclasses.Field) -> str:
    tp = _type(f)
    if tp is bool:
        return "bool"
    if typing.get_origin(tp) is tuple:
        return f.metadata.get("cli", "csv")
    return "scalar"


def _element_type(f: dataclasses.Field) -> type:
    tp = _type(f)
    return typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """The value in the field's own type (a list as a tuple, an int as a float, a str as a Path);
    a value of the wrong kind raises, naming the field."""
    if value is None:
        return value
    kind, element = _kind(f), _element_type(f)
    try:
        if kind in ("csv", "json", "append"):
            if isinstance(value, str | bytes) or not isinstance(value, Sequence):
                raise TypeError
            return tuple(_coerce_one(element, item) for item in value)
        return _coerce_one(element, value)
    except (TypeError, ValueError):
        want = element.__name__ if kind in ("scalar", "bool") else f"a list of {element.__name__}"
        like = f"like the default {f.default!r}" if f.default not in (None, ()) else f"see `{_flag(f.name)}` in --help"
        raise ValueError(f"`{f.name}` is {value!r} ({type(value).__name__}); give {want} ({like})") from None


def _coerce_one(tp: type, value: Any) -> Any:
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is Path and isinstance(value, str | Path):
        return Path(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise TypeError(tp)


def _text(value: Any, kind: str = "scalar") -> str:
    """How a value is written on a command line (and in --help); `float(_text(x)) == x` for floats."""
    if kind == "json":
        return json.dumps(list(value))
    if kind in ("csv", "append"):
        return ",".join(_text(item) for item in value)
    if value is None:
        return ""
    if isinstance(value, float):
        short = format(value, "g")
        return short if float(short) == value else repr(value)
    return str(value)


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"not a JSON list of strings: {text!r}")
    return value


def _csv_of(element: type):
    def parse(text: str) -> tuple:
        return tuple(element(part.strip()) for part in text.split(",") if part.strip())

    parse.__name__ = f"comma-separated {element.__name__}"  # argparse names the type in its errors
    return parse


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return str(value) if isinstance(value, Path) else value
