"""tunegate's wiring: the command line (`tunegate.cli`), `tunegate serve` and the demo.

The only package that composes all the others (`core`, `guardrails`, `training`, `evalsuite`,
`gateway`, `bench`), and nothing imports it (tests aside); import-linter checks both. Commands import
their packages lazily, so `tunegate --help` stays fast and a settings error is reported first.
"""

__version__ = "0.1.0"
