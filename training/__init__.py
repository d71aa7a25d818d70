"""Training: the embedded domain and bootstrap base model, data curation, LoRA training, the adapter registry.

May import `tunegate` and `guardrails`; never `gateway` or `evalsuite`.
"""
