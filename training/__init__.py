"""Training: the embedded domain and bootstrap base model, data curation, LoRA training, the adapter registry.

May import `guardrails` and `core`; never `gateway` or `evalsuite`.
"""
