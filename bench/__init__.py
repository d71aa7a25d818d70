"""Benchmarks: each prints one JSON object and writes plots; `tunegate bench ...` runs them.
They measure the product's own code (imported, never copied) beside a fair baseline, in one run;
tests never assert on their timings.

May import `gateway`, `training`, `evalsuite`, `guardrails` and `core`; only the wiring (`tunegate`)
imports it.
"""
