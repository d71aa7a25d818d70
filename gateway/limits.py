"""Per-key rate limits: requests and tokens per minute, as token buckets, answered with 429 and
`Retry-After`.

Buckets live in this process: with N gateway replicas a key gets up to N times its limit, so set
per-key limits as (limit / replicas). Why not the database: a shared counter would put a write on
every request's critical path, which is what the batched traffic log exists to avoid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.errors import RateLimited


@dataclass
class Bucket:
    capacity: float
    per_second: float
    level: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    def refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_second)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 when it is now)."""
        self.refill()
        return 0.0 if self.level >= amount else (amount - self.level) / self.per_second


class RateLimiter:
    def __init__(self) -> None:
        self.requests: dict[int, Bucket] = {}
        self.tokens: dict[int, Bucket] = {}

    @staticmethod
    def _bucket(table: dict[int, Bucket], key_id: int, per_minute: int) -> Bucket:
        bucket = table.get(key_id)
        if bucket is None or bucket.capacity != per_minute:
            bucket = table[key_id] = Bucket(per_minute, per_minute / 60.0)
        return bucket

    def admit(self, key_id: int, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """Take one request from the key's budget, or raise `RateLimited` saying when to come back."""
        if tokens_per_minute:
            tokens = self._bucket(self.tokens, key_id, tokens_per_minute)
            wait = tokens.wait_for(1)  # the token budget is spent: wait until it is positive again
            if wait > 0:
                raise RateLimited(f"token limit of {tokens_per_minute} tokens per minute reached", wait)
        if requests_per_minute:
            requests = self._bucket(self.requests, key_id, requests_per_minute)
            wait = requests.wait_for(1)
            if wait > 0:
                raise RateLimited(f"request limit of {requests_per_minute} requests per minute reached", wait)
            requests.level -= 1

    def spend_tokens(self, key_id: int, tokens_per_minute: int | None, tokens: int) -> None:
        """Charge the tokens a finished request used (the bucket may go negative: later requests wait)."""
        if tokens_per_minute and tokens:
            bucket = self._bucket(self.tokens, key_id, tokens_per_minute)
            bucket.refill()
            bucket.level -= tokens
