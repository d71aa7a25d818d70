"""Guardrails: hallucination detectors (pure functions of request, answer, context, logprobs and
samples to scores), one calibrated risk, and the policy mapping it to allow / annotate / hold / block.
May import `core` only (of tunegate's own packages).

Public API (import from the submodules; this package imports nothing heavy on its own):
- `guardrails.types`: `CheckInput`, `DetectorResult`
- `guardrails.registry`: `build_detectors(settings) -> {name: detector}`, `default_registry()`
- `guardrails.guard`: `Guard(settings, calibration_path).check(CheckInput) -> RiskReport`; it runs only
  the detectors its risk model weighs, and plans a request with `Guard.active`, `Guard.needs_logprobs`
  and `Guard.needs_samples`
- `guardrails.calibration`: `Calibration` (fit / save / load / risk), `DefaultCombination`,
  `rows_from_reviews`
- `guardrails.policy`: `decide(risk, PolicySettings) -> "allow" | "annotate" | "hold" | "block"`
- `guardrails.retrieval`: `KnowledgeBase` (BM25 over a JSONL of passages)
- `guardrails.cache`: `LRU`, and the list of every cache in the package (each keyed by a hash of its
  text, never the text, and bounded)
"""
