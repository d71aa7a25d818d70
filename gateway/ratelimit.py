"""Per-key limits shared by every gateway replica through Redis (`gateway.redis_url`).

Without `redis_url` each process keeps its own token buckets (`gateway.deps.RateLimiter`): with N
replicas a key gets up to N times its limit. With it, `RedisRateLimiter` keeps the same buckets in
Redis, so the replicas together admit a key's limit, not N times it.

The algorithm is the in-process one, unchanged: two token buckets per key (requests and tokens per
minute), each holding up to one minute's budget and refilled continuously at `limit / 60` per second.
A request is admitted when the token bucket holds at least 1 (the tokens a request uses are only known
after it, and charged then: the bucket may go negative, and later requests wait until it is positive
again) and the request bucket holds at least 1 (it takes 1). A bucket whose limit changed starts full.

One Lua script (`SCRIPT`, sent once and then called by its SHA: `register_script`) reads, refills and
updates both of a key's buckets atomically, so two replicas can never both take the last request. Its
clock is Redis' (`TIME`), not the replicas', so their clocks' skew does not matter. The buckets are
hashes `tunegate:ratelimit:{<key id>}:requests` and `...:tokens` (the braces are a Redis Cluster hash
tag: both keys of one script live on one shard); each expires when it would have refilled (a missing
bucket is a full one), so idle keys cost Redis nothing. Another deployment on the same Redis must use
another database (`redis://host:6379/1`): key ids are only unique within one tunegate database.

Redis unreachable or failing: fail open to the process's own buckets. Rate limits protect capacity
and fairness, not access (the API key does that), so an outage of Redis should not become an outage of
the whole API. Falling back to the local buckets (not to no limit at all) still bounds each key, at
its per-replica limit times the number of replicas, as if `redis_url` were not set. Every failed call
counts in `tunegate_rate_limit_backend_errors_total` and is logged (once per outage); after a failure
the replica asks Redis again only after `retry_s`, so an unreachable Redis does not add its timeout to
every request. Calls to Redis are async (`redis.asyncio`) and time out after `timeout_s`: the event
loop never blocks on them.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from core.settings import GatewaySettings
from gateway.deps import RateLimiter
from gateway.errors import RateLimited
from gateway.metrics import Metrics

log = logging.getLogger("tunegate.gateway")
PREFIX = "tunegate:ratelimit:"

# KEYS[1]: the key's request bucket, KEYS[2]: its token bucket (hashes: level, stamp, cap).
# ARGV[1]: requests per minute, ARGV[2]: tokens per minute (0: no such limit), ARGV[3]: tokens to charge
# (0: admit one request). Returns {1 or 0 (admitted), the bucket that refused ("requests" or "tokens"),
# seconds to wait (a string: Redis would truncate a Lua number to an integer)}.
SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

local function level_of(key, cap)
  local v = redis.call('HMGET', key, 'level', 'stamp', 'cap')
  local level, stamp = tonumber(v[1]), tonumber(v[2])
  if level == nil or stamp == nil or tonumber(v[3]) ~= cap then return cap end
  return math.min(cap, level + math.max(0, now - stamp) * cap / 60)
end

local function save(key, cap, level)
  redis.call('HSET', key, 'level', string.format('%.6f', level), 'stamp', string.format('%.6f', now), 'cap', cap)
  -- a missing bucket is a full one: keep this one until it would have refilled, and a second more
  redis.call('PEXPIRE', key, string.format('%d', math.ceil((cap - level) * 60000 / cap) + 1000))
end

local rpm, tpm, spend = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if spend > 0 then
  if tpm > 0 then save(KEYS[2], tpm, level_of(KEYS[2], tpm) - spend) end
  return {1, '', '0'}
end
if tpm > 0 then
  local level = level_of(KEYS[2], tpm)
  if level < 1 then return {0, 'tokens', string.format('%.6f', (1 - level) * 60 / tpm)} end
end
if rpm > 0 then
  local level = level_of(KEYS[1], rpm)
  if level < 1 then return {0, 'requests', string.format('%.6f', (1 - level) * 60 / rpm)} end
  save(KEYS[1], rpm, level - 1)
end
return {1, '', '0'}
"""


class RedisRateLimiter(RateLimiter):
    """`RateLimiter`'s buckets kept in Redis, shared by every replica; its own (inherited, in-process)
    buckets are the fallback while Redis fails (see the module's docstring)."""

    def __init__(
        self,
        url: str,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        *,
        metrics: Metrics | None = None,
        prefix: str = PREFIX,
        timeout_s: float = 0.5,
        retry_s: float = 1.0,
    ) -> None:
        super().__init__(requests_per_minute, tokens_per_minute)
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.script = self.client.register_script(SCRIPT)
        self.metrics, self.prefix, self.timeout_s, self.retry_s = metrics, prefix, timeout_s, retry_s
        self.down_until = 0.0  # monotonic time before which Redis is not asked again
        self.down = False

    def keys(self, key_id: int) -> list[str]:
        return [f"{self.prefix}{{{key_id}}}:requests", f"{self.prefix}{{{key_id}}}:tokens"]

    async def _run(self, key_id: int, requests: int, tokens: int, spend: int) -> list | None:
        """The script's answer, or None when Redis failed (or failed less than `retry_s` ago)."""
        if time.monotonic() < self.down_until:
            return None
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                answer = await self.script(keys=self.keys(key_id), args=[requests, tokens, spend])
        except (RedisError, OSError, TimeoutError) as err:
            self.down_until = time.monotonic() + self.retry_s
            if self.metrics is not None:
                self.metrics.rate_limit_backend_errors.inc()
            if not self.down:
                self.down = True
                log.warning("rate limits: Redis failed (%s); this replica limits keys on its own until it is back", err)
            return None
        if self.down:
            self.down = False
            log.warning("rate limits: Redis is back; limits are shared again")
        return answer

    async def acquire(self, key_id: int, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        if not requests_per_minute and not tokens_per_minute:
            return
        answer = await self._run(key_id, requests_per_minute or 0, tokens_per_minute or 0, 0)
        if answer is None:
            return self.admit(key_id, requests_per_minute, tokens_per_minute)  # fail open, to the local buckets
        admitted, which, wait = answer
        if not int(admitted):
            which = which.decode() if isinstance(which, bytes) else which
            if which == "tokens":
                raise RateLimited(f"token limit of {tokens_per_minute} tokens per minute reached", float(wait))
            raise RateLimited(f"request limit of {requests_per_minute} requests per minute reached", float(wait))

    async def charge(self, key_id: int, tokens_per_minute: int | None, tokens: int) -> None:
        if not (tokens_per_minute and tokens):
            return
        if await self._run(key_id, 0, tokens_per_minute, tokens) is None:
            self.spend_tokens(key_id, tokens_per_minute, tokens)

    async def aclose(self) -> None:
        await self.client.aclose()


def make_limiter(settings: GatewaySettings, metrics: Metrics | None = None) -> RateLimiter:
    """The shared limiter when `settings.redis_url` is set, else the in-process one."""
    if settings.redis_url:
        return RedisRateLimiter(
            settings.redis_url, settings.requests_per_minute, settings.tokens_per_minute, metrics=metrics
        )
    return RateLimiter(settings.requests_per_minute, settings.tokens_per_minute)
