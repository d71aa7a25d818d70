"""The vocabulary: every word of the domain that is stored, sent or compared, as one `StrEnum` here.

Owns the enumerations only; the database models (CHECK constraints), the pydantic schemas, the
guardrails' policy and the gateway's services all import them from this module, so a decision, a
verdict or a role is spelled once. Standard library only; imports nothing of ours.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """What an API key may do: call the model (`app`), review answers (`reviewer`), or both and more."""

    APP = "app"
    REVIEWER = "reviewer"
    ADMIN = "admin"


class AdapterStatus(StrEnum):
    """Where an adapter version stands in its lifecycle; only `canary` and `active` versions serve.

    candidate -> gated -> canary -> active -> retired, or a candidate rejected at the gate, or a
    canary rolled back (`core.lifecycle.TRANSITIONS` is the whole graph)."""

    CANDIDATE = "candidate"
    GATED = "gated"
    CANARY = "canary"
    ACTIVE = "active"
    RETIRED = "retired"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"


class Decision(StrEnum):
    """What the route's policy does with an answer, by its calibrated risk (in rising order)."""

    ALLOW = "allow"
    ANNOTATE = "annotate"
    HOLD = "hold"
    BLOCK = "block"


class ReviewReason(StrEnum):
    """Why an item is in the review queue: the client waits for it (`held`), it was `sampled` at random,
    or the eval suite chose it because it teaches most (`priority`: near the threshold, far from the
    training data, in a drift cluster)."""

    HELD = "held"
    SAMPLED = "sampled"
    PRIORITY = "priority"


class ReviewStatus(StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    DECIDED = "decided"
    EXPIRED = "expired"


class Verdict(StrEnum):
    """A reviewer's judgement of one answer (an `edit` carries the corrected answer)."""

    APPROVE = "approve"
    REJECT = "reject"
    EDIT = "edit"


class DatasetKind(StrEnum):
    TRAIN = "train"
    TEST = "test"
    HOLDOUT = "holdout"
    RAW = "raw"


class ExampleSource(StrEnum):
    SEED = "seed"
    REVIEW = "review"
    GENERATED = "generated"
    IMPORT = "import"


class EvalKind(StrEnum):
    ONLINE = "online"
    GATE = "gate"
    HOLDOUT = "holdout"
    CANARY = "canary"
    CALIBRATION = "calibration"


class EvalStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class RolloutStatus(StrEnum):
    """A canary rollout: taking traffic step by step, then promoted or rolled back."""

    RUNNING = "running"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
