"""Faults, injected on purpose (`bench.faults`, which `bench/reliability.py` runs too): vLLM killed or
stalled mid-request and mid-stream, PostgreSQL unreachable under load, the registry's disk full, a
worker SIGKILLed while it holds a lease, the gateway SIGKILLed while its vLLM runs.

Training killed mid-run is `tests/test_training.py::test_resumes_from_last_checkpoint_after_a_kill`.
No real vLLM: the stand-in is `bench.fault_upstream`. Each fault asserts behaviour, never timings.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from bench import faults
from core.io import free_port
from core.vllm import VllmServer


def _assert_survived(outcome: dict) -> None:
    assert outcome["survived"], outcome.get("failed")


def test_the_gateways_vllm_dies_with_it(tmp_path):
    """Before: vLLM ran in a session of its own and nothing tied it to its parent, so a gateway killed
    with SIGKILL left an orphan vLLM holding the port and the memory."""
    _assert_survived(faults.orphan_vllm(tmp_path))


def test_vllm_still_stops_cleanly_and_refuses_a_missing_model(tmp_path):
    port = free_port()
    stand_in = [sys.executable, "-m", "bench.fault_upstream", "--port", str(port)]
    with VllmServer(tmp_path, port=port, command=stand_in) as server:
        assert server.proc is not None and server.proc.poll() is None
    assert server.proc.poll() is not None
    with pytest.raises(Exception, match="config.json"):
        VllmServer(tmp_path, port=port).start()


def test_a_parent_gone_before_exec_never_leaves_a_child(tmp_path):
    """The race the preexec check closes: the child of a dead parent ends before it runs anything."""
    from core.vllm import _die_with_parent

    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=_die_with_parent(parent_pid=1)
    )
    try:
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)


@pytest.mark.parametrize("guardrails", [True, False], ids=["buffered", "live"])
def test_vllm_killed_or_stalled_mid_request_and_mid_stream(tmp_path, guardrails):
    outcome = faults.vllm_faults(tmp_path, guardrails=guardrails)
    _assert_survived(outcome)
    # every request the gateway accepted is in the traffic log, failures with their status
    assert sorted(outcome["logged_statuses"]) == [200, 200, 200, 502, 502, 504, 504]


def test_a_worker_killed_holding_a_lease_is_replaced_and_the_job_done_once(tmp_path):
    _assert_survived(faults.worker_lease(tmp_path))


def test_a_worker_killed_holding_a_lease_on_postgres(tmp_path, postgres_database):
    from .conftest import reset_postgres_schema

    reset_postgres_schema(postgres_database)
    _assert_survived(faults.worker_lease(tmp_path, db_url=postgres_database))


def test_the_registry_disk_full_leaves_no_half_adapter(tmp_path):
    _assert_survived(faults.registry_enospc(tmp_path))


def test_postgres_down_under_load_loses_no_answered_request(tmp_path, postgres_database):
    """The TCP proxy in front of PostgreSQL is killed (every connection cut) for a few seconds while
    requests come in; the real server is never touched."""
    from .conftest import reset_postgres_schema

    reset_postgres_schema(postgres_database)
    outcome = faults.postgres_outage(tmp_path, outage_s=6.0, rate=5.0, db_url=postgres_database)
    _assert_survived(outcome)
    assert outcome["answered"] > 0


def test_a_review_decision_while_postgres_is_down_is_refused_clearly_and_lands_after(tmp_path, postgres_database):
    from .conftest import reset_postgres_schema

    reset_postgres_schema(postgres_database)
    _assert_survived(faults.review_outage(tmp_path, db_url=postgres_database))


def test_a_gateway_killed_under_load_loses_no_answered_request(tmp_path):
    """Each answered request's row is in the traffic-log journal before its answer leaves, and the
    restarted gateway replays the journal: SIGKILL under load loses none (it lost 2 to 3 of ~26 before)."""
    outcome = faults.gateway_killed(tmp_path)
    assert outcome["answered"] > 0
    _assert_survived(outcome)
