"""Every Redis key trackstream uses, built in one place. This docstring is the key map.

A stage (or one shard of a stage) owns one Redis Cluster hash tag, so all of its keys
hash to one slot. That is what lets a dead-letter move (``XADD`` to the dead-letter
stream + ``XACK`` on the stream) run as one atomic Lua script on a cluster. The tag
is the stage's name, ``{stage}``, unless :data:`PLACED` gives the stage another one;
``prefix`` separates deployments sharing one Redis (it is outside the tag, so it
does not move a stage to another slot).

======================================  ======  ==============================================
key (``{t}`` = the stage's tag)         type    what
======================================  ======  ==============================================
``{p}:{t}:stream``                      stream  the stage's input; consumer group ``stage``
``{p}:{t}:priority``                    stream  urgent lane, served before ``stream``
``{p}:{t}:dlq``                         stream  dead letters: origin id, category, error, fields
``{p}:{t}:redriven``                    set     dead-letter ids already redriven (redrive once)
``{p}:{t}:deferrals``                   hash    ``<lane>:<entry id>`` -> deliveries that were
                                                deferrals (see below); pending entries only
``{p}:{t}:heartbeats``                  hash    consumer name -> last heartbeat (unix ms)
``{p}:{t}:lease:{consumer}``            string  holder token of a consumer name (``SET NX PX``)
``{p}:{t}:lock:{name}``                 string  a named lock of the stage (``SET NX PX``)
``{p}:{t}:fence:{name}``                string  fencing counter that goes with ``lock:{name}``
``{p}:{t}:state:{name}``                string  small state a stage shares across its workers
``{p}:{t}:ratelimit:{name}``            string  a rate limit shared by all workers (GCRA, µs)
``{p}:{t}:info:{consumer}``             hash    a worker's host, pid, counts (TTL >= 10 min)
``{p}:{t}:history:{minute}``            hash    the stage's counts in one minute (TTL ~1 h)
======================================  ======  ==============================================

Waiting spends nothing: an entry's deliveries that count toward ``max_deliveries``
are Redis's ``times_delivered`` (XPENDING) minus its count in ``deferrals`` (``lane``
is ``stream`` or ``priority``, the input stream key's last part). Every handler run
is a delivery (a retry is an ``XCLAIM`` that adds one); a run that ends in a deferral
(:class:`~streams.errors.Defer`, Redis unreachable, the shutdown grace) raises the
count in ``deferrals`` by one, written as it happens and always before the entry can
be retried, handed back or claimed. A consumer that dies *while running* a handler
has not written that run's deferral, so the run counts; one that dies while the
entry waits has. The count is written and dropped in the same Lua script as the
step it belongs to (ack, dead letter, hand-back), all in the stage's slot.

Where the stages live on a cluster. ``redis-cli --cluster create`` with three
masters gives them slots 0-5460, 5461-10922 and 10923-16383; the tags are picked so
that the pipeline's stages spread over all three (one master's outage then stalls
one or two stages, not all, and the load is shared):

===============  =================  =====  ===============================
stage            tag                slot   master (default 3-master split)
===============  =================  =====  ===============================
fetch            ``{fetch}``        1745   1st (0-5460)
scheduler        ``{scheduler}``    5398   1st (0-5460)
geocode          ``{geocode@2}``    8387   2nd (5461-10922)
view-refresh     ``{view-refresh}`` 9757   2nd (5461-10922)
geofence         ``{geofence@3}``   11589  3rd (10923-16383)
===============  =================  =====  ===============================

(``CLUSTER KEYSLOT`` of any key of the stage gives its slot; the test
``test_stages_spread_over_three_masters`` checks this table against a real cluster.)
Until this table existed every tag was ``{stage}``, and fetch, geocode, geofence and
scheduler all hashed to the first master; geocode's and geofence's keys moved with it
(see the README's upgrade note).

With ``shards > 1`` the tag is ``{t.0}`` ... ``{t.N-1}`` (e.g. ``{geocode@2.3}``),
which spread over the slots by their hash; the consumer group is always named after
the stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")

# stages whose hash tag is not their name: placed on the 2nd and 3rd master of a
# default 3-master split (see the table above)
PLACED: dict[str, str] = {"geocode": "geocode@2", "geofence": "geofence@3"}


def stage_tag(stage: str) -> str:
    """The hash-tag name of a stage (without the braces)."""
    return PLACED.get(stage, stage)


def check_name(kind: str, value: str) -> str:
    """Stage names and prefixes go into keys: keep them short and tag-safe."""
    if not _NAME.match(value):
        raise ValueError(
            f"{kind} {value!r} is not valid: use 1-40 lowercase letters, digits, '-' or '_', "
            "starting with a letter"
        )
    return value


@dataclass(frozen=True, slots=True)
class StageKeys:
    """The keys of one stage shard."""

    prefix: str
    stage: str
    shard: int = 0
    shards: int = 1

    def __post_init__(self) -> None:
        check_name("prefix", self.prefix)
        check_name("stage", self.stage)
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {self.shard} is outside 0..{self.shards - 1}")

    @property
    def tag(self) -> str:
        base = stage_tag(self.stage)
        name = base if self.shards == 1 else f"{base}.{self.shard}"
        return "{" + name + "}"

    @property
    def group(self) -> str:
        return self.stage

    def _key(self, kind: str) -> str:
        return f"{self.prefix}:{self.tag}:{kind}"

    @property
    def stream(self) -> str:
        return self._key("stream")

    @property
    def priority(self) -> str:
        return self._key("priority")

    @property
    def dlq(self) -> str:
        return self._key("dlq")

    @property
    def redriven(self) -> str:
        return self._key("redriven")

    @property
    def deferrals(self) -> str:
        return self._key("deferrals")

    @staticmethod
    def deferral_field(stream: str, entry_id: str) -> str:
        """The field of an entry in :attr:`deferrals` (the scripts build it the same way)."""
        return f"{stream.rsplit(':', 1)[-1]}:{entry_id}"

    @property
    def heartbeats(self) -> str:
        return self._key("heartbeats")

    def lease(self, consumer: str) -> str:
        return self._key(f"lease:{consumer}")

    def lock(self, name: str) -> str:
        return self._key(f"lock:{name}")

    def fence(self, name: str) -> str:
        return self._key(f"fence:{name}")

    def state(self, name: str) -> str:
        return self._key(f"state:{name}")

    def ratelimit(self, name: str) -> str:
        return self._key(f"ratelimit:{name}")

    def info(self, consumer: str) -> str:
        return self._key(f"info:{consumer}")

    def history(self, minute: int) -> str:
        return self._key(f"history:{minute}")

    def streams(self) -> tuple[str, str]:
        """Input streams in the order they are served."""
        return (self.priority, self.stream)


def stage_shards(prefix: str, stage: str, shards: int = 1) -> list[StageKeys]:
    return [StageKeys(prefix, stage, i, shards) for i in range(shards)]


def shard_for(partition_key: str, shards: int) -> int:
    """Stable shard of a partition key (crc32, not Python's salted hash)."""
    if shards == 1:
        return 0
    import zlib

    return zlib.crc32(partition_key.encode()) % shards
