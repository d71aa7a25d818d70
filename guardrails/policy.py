"""The policy: one calibrated risk -> allow / annotate / hold / block.

Owns the mapping only (the thresholds live in `PolicySettings`, per route or guardrail-wide). Imports
`core.settings` and `core.vocab`.
"""

from __future__ import annotations

import math

from core.settings import PolicySettings
from core.vocab import Decision


def decide(risk: float, policy: PolicySettings) -> Decision:
    """Below `annotate_at` allow; from it annotate; from `hold_at` hold; from `block_at` block.

    A threshold above 1 switches its action off (no risk reaches it)."""
    if isinstance(risk, bool) or not isinstance(risk, int | float) or math.isnan(risk):
        raise ValueError(f"`risk` must be a number in [0, 1], got {risk!r}")
    if not 0.0 <= risk <= 1.0:
        raise ValueError(f"`risk` must lie in [0, 1], got {risk}")
    if risk >= policy.block_at:
        return Decision.BLOCK
    if risk >= policy.hold_at:
        return Decision.HOLD
    if risk >= policy.annotate_at:
        return Decision.ANNOTATE
    return Decision.ALLOW
