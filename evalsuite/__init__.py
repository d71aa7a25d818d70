"""The eval suite: online scoring of live traffic, evolving test sets, drift detection, retraining
triggers, the candidate gate, canary promotion and rollback, reports.
May import `guardrails` and `core`; never `gateway` or `training`.
"""
