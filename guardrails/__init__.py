"""Guardrails: hallucination detectors (pure functions of request, answer, context, logprobs and
samples to scores) and the policy mapping scores to allow / annotate / hold / block.
May import `tunegate.settings` only.
"""
