"""tunegate's ground floor: what every process shares and every package may import.

Owns the typed settings (`core.settings`), the database (`core.db`: models, sessions, migrations in
`core/migrations`, the jobs queue and its lease protocol), the vLLM process and its adapter endpoints
(`core.vllm`), API keys (`core.keys`), files and small helpers (`core.io`), the domain's words
(`core.vocab`) and the labels reviewers produced (`core.labels`).

Imports none of tunegate's other packages (`guardrails`, `training`, `evalsuite`, `gateway`, `bench`,
`tunegate`); import-linter checks it (`tests/test_architecture.py`).
"""
