"""One webhook endpoint (a URL's origin: scheme, host, port), shared by every
subscription that points at it and every notify worker: its rate limit, circuit
breaker and ``Retry-After`` pause live in Redis.

Keys (built by :func:`endpoint_keys` from :class:`streams.keys.StageKeys`, so they
carry the notify stage's hash tag and sit in its cluster slot; ``{h}`` = the first 16
hex digits of the origin's SHA-256, never the URL itself)::

    {p}:{notify}:ratelimit:endpoint-{h}   string  GCRA state (streams.ratelimit)
    {p}:{notify}:state:endpoint-{h}       hash    pause_until, open_until, trial_until
                                                  (Redis time, ms), failures

:meth:`EndpointGate.admit` says how long to wait (a pause or an open circuit; after
``reset_s`` one trial request at a time goes through) or lets a request go, then
:meth:`EndpointGate.reserve` takes the next rate slot. :meth:`EndpointGate.record`
counts a failure (``threshold`` consecutive ones, or a failed trial, open the
circuit for ``reset_s``), clears them on a success, and sets the pause a 429/503's
``Retry-After`` asked for, which then holds every request to that origin.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from streams.connection import Client, translate
from streams.keys import StageKeys
from streams.ratelimit import SharedRateLimiter
from streams.scripts import Lua

# KEYS: state hash. ARGV: trial ms. Returns {wait ms, trial (0|1), failures}.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = redis.call('HMGET', KEYS[1], 'pause_until', 'open_until', 'trial_until', 'failures')
local pause = tonumber(v[1] or '0')
local open = tonumber(v[2] or '0')
local trial = tonumber(v[3] or '0')
local failures = tonumber(v[4] or '0')
if pause > now then return {pause - now, 0, failures} end
if open > 0 then
  if open > now then return {open - now, 0, failures} end
  if trial > now then return {trial - now, 0, failures} end
  redis.call('HSET', KEYS[1], 'trial_until', now + tonumber(ARGV[1]))
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) + 3600000)
  return {0, 1, failures}
end
return {0, 0, failures}
"""

# KEYS: state hash. ARGV: ok (0|1), trial (0|1), threshold, reset ms, pause ms.
RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] == '1' then
  redis.call('HDEL', KEYS[1], 'failures', 'open_until', 'trial_until')
else
  local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
  if ARGV[2] == '1' or failures >= tonumber(ARGV[3]) then
    redis.call('HSET', KEYS[1], 'open_until', now + tonumber(ARGV[4]), 'trial_until', 0)
  end
end
local pause = tonumber(ARGV[5])
if pause > 0 then
  local until_ = now + pause
  local old = tonumber(redis.call('HGET', KEYS[1], 'pause_until') or '0')
  if until_ > old then redis.call('HSET', KEYS[1], 'pause_until', until_) end
end
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[4]), pause) + 3600000)
return 1
"""


def endpoint_name(origin: str) -> str:
    return "endpoint-" + hashlib.sha256(origin.encode()).hexdigest()[:16]


def endpoint_keys(prefix: str, stage: str, origin: str) -> tuple[str, str]:
    """(rate limit key, state key) of one origin, in the stage's hash tag."""
    keys = StageKeys(prefix, stage)
    name = endpoint_name(origin)
    return keys.ratelimit(name), keys.state(name)


@dataclass(frozen=True, slots=True)
class Admission:
    wait_s: float  # > 0: not now (paused, or the circuit is open)
    trial: bool = False  # the half-open circuit's one trial request
    failures: int = 0


class EndpointGate:
    def __init__(
        self,
        client: Client,
        prefix: str,
        stage: str,
        origin: str,
        *,
        rate_per_s: float,
        max_rate_wait_s: float,
        threshold: int,
        reset_s: float,
        trial_s: float,
        url: str = "",
    ) -> None:
        self.origin = origin
        rate_key, self.state_key = endpoint_keys(prefix, stage, origin)
        self.limiter = SharedRateLimiter(
            client, rate_key, rate_per_s, 1, url, max_wait_s=max_rate_wait_s
        )
        self.threshold = threshold
        self.reset_ms = int(reset_s * 1000)
        self.trial_ms = int(trial_s * 1000)
        self._url = url
        self._admit = Lua(client, ADMIT)
        self._record = Lua(client, RECORD)

    async def admit(self) -> Admission:
        with translate(self._url):
            wait_ms, trial, failures = await self._admit(
                keys=[self.state_key], args=[self.trial_ms]
            )
        return Admission(int(wait_ms) / 1000, bool(int(trial)), int(failures))

    async def reserve(self) -> float:
        """The next rate slot: seconds until it (RateLimited when too far away)."""
        return await self.limiter.reserve()

    async def record(self, ok: bool, admission: Admission, pause_s: float | None) -> None:
        if ok and not admission.trial and not admission.failures and not pause_s:
            return  # nothing to clear or set: no round trip
        args: list[Any] = [
            int(ok),
            int(admission.trial),
            self.threshold,
            self.reset_ms,
            int((pause_s or 0) * 1000),
        ]
        with translate(self._url):
            await self._record(keys=[self.state_key], args=args)
