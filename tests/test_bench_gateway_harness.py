"""The pure parts of the gateway-overhead harness: hey's CSV, the load split, added latency,
max_rps, and its settings (`GatewayBenchConfig` and the command line built from it). No servers,
no load, no timing."""

import dataclasses
import json
import math

import pytest

from bench.gateway_config import ALL_TARGETS, GatewayBenchConfig, build_parser
from bench.gateway_overhead import finish
from bench.gateway_stats import (
    HeyRow,
    added_latency,
    max_rps,
    parse_hey_csv,
    percentile,
    split_rate,
    split_workers,
    summarize,
)

HEY_CSV = """response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
0.0528,0.0001,0.0000,0.0000,0.0526,0.0001,200,0.2096
0.0527,0.0002,0.0000,0.0001,0.0525,0.0000,200,0.2097
0.0610,0.0001,0.0000,0.0000,0.0609,0.0000,200,0.4066
0.0020,0.0001,0.0000,0.0000,0.0019,0.0000,429,0.4067
0.0540,0.0001,0.0000,0.0000,0.0539,0.0000,500,0.6070
0.0800,0.00
"""


def test_parse_hey_csv_reads_rows_and_skips_a_truncated_line():
    rows = parse_hey_csv(HEY_CSV)
    assert len(rows) == 5
    assert rows[0] == HeyRow(latency_s=0.0528, status=200, offset_s=0.2096)
    assert [r.status for r in rows] == [200, 200, 200, 429, 500]
    shifted = parse_hey_csv(HEY_CSV, offset_shift_s=1.0)
    assert shifted[2].offset_s == pytest.approx(1.4066)


def test_parse_hey_csv_of_nothing_is_empty():
    assert parse_hey_csv("") == []
    assert (
        parse_hey_csv("response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset\n")
        == []
    )


def test_summarize_counts_non_2xx_as_errors_and_times_only_2xx():
    rows = parse_hey_csv(HEY_CSV)
    stats = summarize(rows, rate=2.0, duration_s=1.0, scheduled=6)
    assert stats["requests"] == 5 and stats["ok"] == 3 and stats["errors"] == 2
    assert stats["error_rate"] == pytest.approx(0.4)
    assert stats["achieved_rps"] == pytest.approx(3.0)
    assert stats["p50_ms"] == pytest.approx(52.8)
    assert stats["max_ms"] == pytest.approx(61.0)
    assert stats["missing"] == 1
    assert stats["sustained"] is False  # 40% errors


def test_summarize_sustained_needs_few_errors_and_95_percent_of_the_rate():
    ok = [HeyRow(0.05, 200, i / 100) for i in range(100)]
    assert summarize(ok, rate=100, duration_s=1.0)["sustained"] is True
    assert summarize(ok[:95], rate=100, duration_s=1.0)["sustained"] is True
    assert summarize(ok[:94], rate=100, duration_s=1.0)["sustained"] is False
    one_error = ok[:99] + [HeyRow(0.05, 502, 0.99)]
    assert summarize(one_error, rate=99, duration_s=1.0)["sustained"] is False  # 1% is not < 1%
    nothing = summarize([], rate=10, duration_s=1.0)
    assert nothing["error_rate"] == 1.0 and nothing["p99_ms"] is None and nothing["sustained"] is False


def test_percentile_interpolates_like_numpy():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


@pytest.mark.parametrize("rate", [25, 50, 100, 200, 400, 7, 1000])
def test_split_rate_gives_the_rate_and_workers_enough_for_the_delay(rate):
    workers, qps = split_rate(rate, delay_s=0.05)
    assert workers * qps == pytest.approx(rate)
    assert workers == math.ceil(rate * 0.15 - 1e-9)
    # each worker's interval leaves the delay plus 100 ms of headroom
    assert 1 / qps >= 0.15 - 1e-9


def test_split_rate_examples():
    assert split_rate(25, 0.05) == (4, 6.25)
    assert split_rate(400, 0.05) == (60, pytest.approx(400 / 60))
    assert split_rate(1, 0.05) == (1, 1.0)
    with pytest.raises(ValueError):
        split_rate(0, 0.05)


def test_split_workers_spreads_evenly():
    assert split_workers(60, 1) == [60]
    assert split_workers(60, 4) == [15, 15, 15, 15]
    assert split_workers(10, 3) == [4, 3, 3]
    assert split_workers(2, 5) == [1, 1]  # never a process without a worker


def _stats(p50, p99, ok=True, rate=50):
    return {"p50_ms": p50, "p99_ms": p99, "sustained": ok, "target_rps": rate}


def test_added_latency_is_proxy_minus_direct_at_the_same_rate():
    direct = {"25": _stats(52.0, 57.0), "50": _stats(52.5, 58.0)}
    proxy = {"25": _stats(55.0, 60.5), "50": _stats(60.0, 80.25), "100": _stats(70.0, 90.0)}
    added = added_latency(proxy, direct)
    assert added["25"] == {"added_p50_ms": 3.0, "added_p99_ms": 3.5}
    assert added["50"] == {"added_p50_ms": 7.5, "added_p99_ms": 22.25}
    assert added["100"] == {"added_p50_ms": None, "added_p99_ms": None}  # no baseline at that rate


def test_max_rps_is_the_highest_rate_reached_without_a_failure_below_it():
    def entry(ok, added):
        return {"sustained": ok, "added_p99_ms": added}

    per_rate = {"25": entry(True, 3), "50": entry(True, 10), "100": entry(True, 49.9), "200": entry(True, 50.0)}
    assert max_rps(per_rate) == 100  # 50 ms is not under 50 ms
    per_rate = {"25": entry(True, 3), "50": entry(False, 10), "100": entry(True, 5)}
    assert max_rps(per_rate) == 25  # a rate that fails stops the climb, even if a higher one passes
    assert max_rps({"25": entry(True, 60)}) == 0
    assert max_rps({"25": entry(True, None)}) == 0
    assert max_rps({"100": entry(True, 1), "25": entry(True, 1), "400": entry(True, 1)}) == 400  # order-free


def test_finish_fills_the_headline_numbers(tmp_path):
    direct = {"25": _stats(52.0, 57.0, rate=25), "50": _stats(52.5, 58.0)}
    litellm = {"25": _stats(60.0, 70.0, rate=25), "50": _stats(300.0, 500.0, ok=False)}
    ours = {"25": _stats(55.0, 60.0, rate=25), "50": _stats(56.0, 62.0)}
    result = {
        "config": {"rates_rps": [25, 50], "upstream_delay_ms": 50, "cpu_count": 2, "duration_s": 8},
        "targets": {"direct": {"rates": direct}, "litellm": {"rates": litellm}, "ours": {"rates": ours}},
    }
    finish(result, tmp_path, plot=False)
    assert result["ours_p99_overhead_ms_at_50"] == 4.0
    assert result["litellm_p99_overhead_ms_at_50"] == 442.0
    assert result["ours_max_rps"] == 50
    assert result["litellm_max_rps"] == 25
    assert result["targets"]["ours"]["rates"]["50"]["added_p50_ms"] == 3.5


def test_finish_without_a_proxy_or_with_a_failed_one_says_none(tmp_path):
    result = {
        "config": {"rates_rps": [50]},
        "targets": {"direct": {"rates": {"50": _stats(52.0, 57.0)}}, "ours": {"error": "RuntimeError: no serve"}},
    }
    finish(result, tmp_path, plot=False)
    assert result["ours_max_rps"] is None and result["ours_p99_overhead_ms_at_50"] is None
    assert result["litellm_max_rps"] is None


# ----------------------------------------------------------------------------------------------
# The settings: one dataclass, the command line built from it
# ----------------------------------------------------------------------------------------------

CHANGED = GatewayBenchConfig(
    targets=("ours", "direct"),
    rates=(100, 12.5, 25),
    duration=20,
    delay_ms=0,
    out="/tmp/gw-bench",
    litellm_bin="/opt/litellm/bin/litellm",
    litellm_workers=4,
    ours_cmd=["tunegate", "serve", "--port", "{PORT}", "--note", "a,b"],
    ours_key_cmd=["sh", "-c", 'echo \'{"key": "k"}\''],
    ours_env=("TUNEGATE_LOG_LEVEL=warning", "X=a=b"),
    ours_workers=0,
    ours_model="base",
    ours_migrate=False,
    mock_workers=1,
    model="other",
    hey="/usr/bin/hey",
    hey_procs=4,
    warmup=0,
    pause=0.25,
    start_timeout=30,
    quiet_wait=60,
    quiet_cores=0.5,
    plot=False,
)


def test_every_field_is_documented_and_changed_by_the_round_trip_config():
    for f in dataclasses.fields(GatewayBenchConfig):
        assert f.metadata.get("help"), f"`{f.name}` has no help"
        assert getattr(CHANGED, f.name) != f.default, f"CHANGED leaves `{f.name}` at its default"


@pytest.mark.parametrize("config", [GatewayBenchConfig(), CHANGED], ids=["defaults", "changed"])
def test_config_round_trips_through_argv_and_dict(config):
    assert GatewayBenchConfig.from_argv(config.to_argv()) == config
    assert GatewayBenchConfig(**config.to_dict()) == config
    as_json = json.loads(json.dumps(config.to_dict()))  # what a results file would keep
    assert GatewayBenchConfig(**as_json) == config


def test_config_values_take_the_fields_types():
    assert CHANGED.rates == (12.5, 25.0, 100.0)  # sorted, floats
    assert all(isinstance(r, float) for r in CHANGED.rates)
    assert CHANGED.duration == 20.0 and isinstance(CHANGED.duration, float)
    assert CHANGED.ours_cmd == ("tunegate", "serve", "--port", "{PORT}", "--note", "a,b")
    assert str(CHANGED.out) == "/tmp/gw-bench"


def test_the_documented_flags_parse_as_before():
    config = GatewayBenchConfig.from_argv(
        ["--targets", "direct,ours", "--rates", "50,25", "--duration", "20", "--hey-procs", "4",
         "--quiet-wait", "30", "--no-ours-migrate", "--no-plot", "--ours-env", "A=1", "--ours-env", "B=2",
         "--ours-cmd", '["tunegate", "serve", "--port", "{PORT}"]', "--out", "/tmp/o"]
    )  # fmt: skip
    assert config == GatewayBenchConfig(
        targets=("direct", "ours"), rates=(25, 50), duration=20, hey_procs=4, quiet_wait=30, ours_migrate=False,
        plot=False, ours_env=("A=1", "B=2"), ours_cmd=("tunegate", "serve", "--port", "{PORT}"), out="/tmp/o",
    )  # fmt: skip


def test_parser_flags_and_defaults_come_from_the_fields(capsys):
    parser = build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for f in dataclasses.fields(GatewayBenchConfig):
        assert "--" + f.name.replace("_", "-") in flags
    assert {"--no-plot", "--no-ours-migrate"} <= flags
    assert vars(parser.parse_args([])) == {}  # the dataclass supplies every default
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--help"])
    assert exc.value.code == 0
    assert "(default: 25,50,100,200,400)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("changes", "field_name"),
    [
        ({"targets": ("direct", "vllm")}, "targets"),
        ({"targets": ()}, "targets"),
        ({"rates": ()}, "rates"),
        ({"rates": (25, 0)}, "rates"),
        ({"rates": "25,50"}, "rates"),
        ({"duration": 0}, "duration"),
        ({"duration": "8"}, "duration"),
        ({"delay_ms": -1}, "delay_ms"),
        ({"warmup": -0.5}, "warmup"),
        ({"quiet_cores": 0}, "quiet_cores"),
        ({"hey_procs": 0}, "hey_procs"),
        ({"mock_workers": True}, "mock_workers"),
        ({"ours_workers": -1}, "ours_workers"),
        ({"ours_cmd": []}, "ours_cmd"),
        ({"ours_env": ("=1",)}, "ours_env"),
        ({"hey": ""}, "hey"),
    ],
)
def test_config_validation_names_the_field(changes, field_name):
    with pytest.raises(ValueError, match=f"`{field_name}`"):
        GatewayBenchConfig(**changes)


def test_unknown_settings_are_refused_and_argv_errors_exit_2(capsys):
    with pytest.raises(TypeError, match="duration_s"):
        GatewayBenchConfig(**{"duration_s": 8})
    with pytest.raises(SystemExit) as exc:
        GatewayBenchConfig.from_argv(["--targets", "direct,nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "`targets`" in err and ", ".join(ALL_TARGETS) in err
