"""Reliability in one summary: hostile requests, authorization probes, injected faults and a soak,
all against real gateway processes in front of a stand-in vLLM (`bench.fault_upstream`, the mock
upstream `bench.mock_upstream` for the soak), guardrails on.

Prints one JSON object (and writes `reliability.json`, `reliability.png`, latency and resident
memory over the soak, and the soak's raw `soak_samples.json` to `--out`):

* `hostile_cases`, `server_errors`, `stalls`, `authz_violations`  `bench.soak.probe`'s small corpus
* `fuzz_cases`  null: the fuzzing is a pytest module, not a helper to import (`fuzz_note` says so)
* `faults`      each of `bench.faults` as `survived` or the list of what failed; training killed
                mid-run is a test (`tests/test_training.py`), named here, not rerun (it trains)
* `lost_records`  accepted requests missing from the traffic log after the faults
* `soak_*`      errors, RSS growth, p99 of the first and the last window (`bench.soak`)

Fast by default (a 15 s soak, a 5 s database outage); `--soak-minutes 10 --outage-s 30` is the
full run. Run: `python -m bench.reliability --json [--soak-minutes N] [--out DIR]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench import faults
from bench.fault_rig import HOST, start_gateway
from bench.gateway_harness import Processes, wait_ready
from bench.soak import probe, soak, soak_summary
from core.io import atomic_write_bytes, free_port

TRAINING_KILL = (
    "covered by tests/test_training.py::test_resumes_from_last_checkpoint_after_a_kill (not rerun: it trains)"
)
FUZZ_NOTE = (
    "not wired: the fuzzing (schemathesis) and the large hostile corpus are pytest modules "
    "(tests/test_fuzz.py, tests/test_hostile.py), not helpers to import; run them with pytest. "
    "hostile_cases here are bench.soak.HOSTILE, against a live gateway process"
)


def _say(message: str) -> None:
    print(f"[reliability] {message}", file=sys.stderr, flush=True)


def run_faults(work: Path, outage_s: float, postgres: bool) -> dict[str, dict]:
    """Every fault of `bench.faults`, each in a folder of its own."""
    plan = {
        "orphan_vllm": faults.orphan_vllm,
        "worker_lease": faults.worker_lease,
        "registry_enospc": faults.registry_enospc,
        "vllm_killed_or_stalled": faults.vllm_faults,  # guardrails on (its default)
        "gateway_killed": faults.gateway_killed,
    }
    if postgres:
        plan["postgres_outage"] = lambda d: faults.postgres_outage(d, outage_s=outage_s)
        plan["review_during_outage"] = faults.review_outage
    results = {}
    for name, fault in plan.items():
        _say(f"fault: {name}")
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        results[name] = {**fault(folder), "seconds": round(time.monotonic() - t0, 1)}
    return results


def run_load(work: Path, soak_s: float, rate: float) -> tuple[dict, dict]:
    """The hostile corpus, then the soak, against one gateway (guardrails on) over the mock upstream."""
    work.mkdir(parents=True, exist_ok=True)
    procs = Processes(work)
    try:
        port = free_port()
        mock = procs.start(
            "mock", [sys.executable, "-m", "bench.mock_upstream", "--port", str(port), "--delay-ms", "20",
                     "--workers", "1", "--models", "base"],
        )  # fmt: skip
        wait_ready(mock, f"http://{HOST}:{port}", ["/v1/models"], None, 60)
        gw = start_gateway(procs, work / "var", f"http://{HOST}:{port}", guardrails=True)
        _say("hostile corpus and authorization probes")
        probed = probe(gw)
        _say(f"soak: {soak_s:.0f} s at {rate:g} requests/s")
        soaked = soak(gw, soak_s, rate)
    finally:
        procs.stop_all()
    return probed, soaked


def plot(soaked: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, mem) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ok = [(at, ms) for at, ms, status in soaked["requests"] if status == 200]
    bad = [(at, ms) for at, ms, status in soaked["requests"] if status != 200]
    if ok:
        lat.plot(*zip(*ok, strict=True), ".", markersize=2, label="answered")
    if bad:
        lat.plot(*zip(*bad, strict=True), "x", color="red", label="error")
    lat.set_ylabel("latency (ms)")
    lat.set_yscale("log")
    lat.legend(loc="upper right")
    lat.set_title(f"soak through the gateway, guardrails on: {soaked['rate']:g} requests/s")
    if soaked["rss"]:
        at, rss = zip(*soaked["rss"], strict=True)
        mem.plot(at, [b / 2**20 for b in rss])
    mem.set_ylabel("gateway RSS (MiB)")
    mem.set_xlabel("seconds into the soak")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(
    out: Path, soak_minutes: float = 0.25, rate: float = 10.0, outage_s: float = 5.0, postgres: bool = True
) -> dict:
    """Everything, as one JSON-ready dict; writes the JSON and the plot to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tunegate-reliability-") as tmp:
        work = Path(tmp)
        probed, soaked = run_load(work / "load", soak_minutes * 60, rate)
        fault_results = run_faults(work / "faults", outage_s, postgres)
    verdicts: dict[str, object] = {
        name: "survived" if r["survived"] else r.get("failed") for name, r in fault_results.items()
    }
    verdicts["training_killed"] = TRAINING_KILL
    if not postgres:
        verdicts["postgres_outage"] = verdicts["review_during_outage"] = "not run (--no-postgres)"
    result = {
        "benchmark": "reliability",
        "fuzz_cases": None,
        "fuzz_note": FUZZ_NOTE,
        "hostile_cases": probed["hostile_cases"],
        "authz_cases": probed["authz_cases"],
        "server_errors": probed["server_errors"],
        "unshaped_errors": probed["unshaped_errors"],
        "stalls": probed["stalls"],
        "connection_resets": probed["connection_resets"],
        "authz_violations": probed["authz_violations"],
        "probe_problems": probed["problems"],
        "faults": verdicts,
        "fault_details": fault_results,
        "lost_records": sum(r.get("lost_records") or 0 for r in fault_results.values()),
        **soak_summary(soaked),
        "settings": {"soak_minutes": soak_minutes, "soak_rate": rate, "outage_s": outage_s},
    }
    atomic_write_bytes(out / "soak_samples.json", json.dumps(soaked).encode())  # to plot or summarize again
    result["plot"] = str(plot(soaked, out / "reliability.png"))
    result["json"] = str(out / "reliability.json")
    atomic_write_bytes(out / "reliability.json", (json.dumps(result, indent=2) + "\n").encode())
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the JSON object only")
    parser.add_argument("--out", type=Path, default=Path("bench/out/reliability"))
    parser.add_argument("--soak-minutes", type=float, default=0.25)
    parser.add_argument("--soak-rate", type=float, default=10.0, help="requests per second")
    parser.add_argument("--outage-s", type=float, default=5.0, help="how long PostgreSQL is unreachable")
    parser.add_argument("--no-postgres", action="store_true", help="skip the database outage")
    args = parser.parse_args(argv)
    if args.soak_minutes <= 0 or args.soak_rate <= 0 or args.outage_s < 0:
        parser.error("--soak-minutes and --soak-rate must be positive, --outage-s not negative")
    result = run(args.out, args.soak_minutes, args.soak_rate, args.outage_s, postgres=not args.no_postgres)
    print(json.dumps(result if args.json else {k: v for k, v in result.items() if k != "fault_details"}, indent=2))
    return result


if __name__ == "__main__":
    main()
