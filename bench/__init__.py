"""Benchmarks: each prints one JSON object and writes plots; `tunegate bench ...` runs them.
They measure; tests never assert on their timings."""
