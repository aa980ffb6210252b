"""Dead letters: moving poison entries aside, and listing, inspecting, redriving, purging them.

A dead letter holds the original entry's fields verbatim, plus the runtime's own
fields (origin stream and id, group, consumer, category, error, attempts, failed-at),
named ``dlq:origin``, ``dlq:category``... An original field whose name itself starts
with ``dlq:`` is stored as ``dlq:`` + its name (``dlq:x`` -> ``dlq:dlq:x``), so the
two never mix and every original field comes back as it was (list, show, redrive).
In ``redis-cli`` a dead letter reads as the original entry plus ``dlq:*`` fields.
Dead letters written before the escaping (whose ``dlq:*`` originals were dropped)
read the same way. An entry with more than 1,000 fields (too many for one Lua call)
keeps them packed in one field, ``dlq:packed`` (JSON pairs, bytes as latin-1); it
reads the same, but cannot be redriven. Categories: ``decode``, ``validation``, ``handler``,
``max-deliveries``, ``timeout``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from streams.connection import Client
from streams.keys import StageKeys
from streams.message import Fields
from streams.parse import entry_ms, parse_entries
from streams.scripts import DEAD_LETTER, REDRIVE, Lua

CATEGORIES = ("decode", "validation", "handler", "max-deliveries", "timeout")
META = b"dlq:"
MAX_ERROR_CHARS = 2_000
MAX_INLINE_FIELDS = 1_000  # Lua's unpack() takes ~8,000 values at most


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    origin: str
    origin_id: str
    group: str
    consumer: str
    category: str
    error: str
    attempts: int
    failed_ms: int
    fields: Fields

    @property
    def type(self) -> str:
        return self.fields.get(b"type", b"?").decode(errors="replace")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "origin": self.origin,
            "origin_id": self.origin_id,
            "group": self.group,
            "consumer": self.consumer,
            "category": self.category,
            "error": self.error,
            "attempts": self.attempts,
            "failed_ms": self.failed_ms,
            "type": self.type,
            "fields": {
                k.decode(errors="replace"): v.decode(errors="replace")
                for k, v in self.fields.items()
            },
        }


def _escape(name: bytes) -> bytes:
    return META + name if name.startswith(META) else name


def _pack(fields: Fields) -> bytes:
    return orjson.dumps([[k.decode("latin-1"), v.decode("latin-1")] for k, v in fields.items()])


def _unpack(packed: bytes) -> Fields:
    try:
        pairs = orjson.loads(packed)
        return {k.encode("latin-1"): v.encode("latin-1") for k, v in pairs}
    except (ValueError, TypeError, AttributeError):
        return {b"dlq:packed": packed}  # not ours: shown as it is


def split_fields(stored: Fields) -> tuple[dict[str, bytes], Fields]:
    """A dead letter's fields -> (runtime's own by name, the original fields verbatim)."""
    meta: dict[str, bytes] = {}
    original: Fields = {}
    for k, v in stored.items():
        if not k.startswith(META):
            original[k] = v
        elif k.startswith(META + META):
            original[k[len(META) :]] = v
        else:
            meta[k[len(META) :].decode(errors="replace")] = v
    if "packed" in meta:
        original.update(_unpack(meta.pop("packed")))
    return meta, original


def _from_entry(entry_id: str, stored: Fields) -> DeadLetter:
    own, fields = split_fields(stored)

    def meta(name: str, default: str = "") -> str:
        return own.get(name, default.encode()).decode(errors="replace")

    def number(name: str) -> int:
        try:
            return int(meta(name, "0") or 0)
        except ValueError:
            return 0

    return DeadLetter(
        id=entry_id,
        origin=meta("origin"),
        origin_id=meta("origin_id"),
        group=meta("group"),
        consumer=meta("consumer"),
        category=meta("category", "unknown"),
        error=meta("error"),
        attempts=number("attempts"),
        failed_ms=number("failed"),
        fields=fields,
    )


def dead_letter_args(
    keys: StageKeys,
    *,
    stream: str,
    entry_id: str,
    consumer: str,
    category: str,
    error: str,
    attempts: int,
    fields: Fields,
) -> list[bytes | str | int]:
    """ARGV for the DEAD_LETTER script."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown dead-letter category {category!r}")
    args: list[bytes | str | int] = [keys.group, consumer, entry_id]
    if len(fields) > MAX_INLINE_FIELDS:
        args += [META + b"packed", _pack(fields)]
    else:
        for k, v in fields.items():
            args += [_escape(k), v]
    meta = {
        "origin": stream,
        "origin_id": entry_id,
        "group": keys.group,
        "consumer": consumer,
        "category": category,
        "error": error[:MAX_ERROR_CHARS],
        "attempts": str(attempts),
        "failed": str(time.time_ns() // 1_000_000),
    }
    for name, value in meta.items():
        args += [META + name.encode(), value]
    return args


class DeadLetters:
    """Operations on one stage shard's dead-letter stream."""

    def __init__(self, client: Client, keys: StageKeys, url: str = "") -> None:
        self.client = client
        self.keys = keys
        self.url = url
        self._move = Lua(client, DEAD_LETTER)
        self._redrive = Lua(client, REDRIVE)

    async def move(
        self,
        *,
        stream: str,
        entry_id: str,
        consumer: str,
        category: str,
        error: str,
        attempts: int,
        fields: Fields,
    ) -> str | None:
        """Atomically XADD to the dead-letter stream, XACK and drop the entry's deferral
        count; None if no longer ours."""
        args = dead_letter_args(
            self.keys,
            stream=stream,
            entry_id=entry_id,
            consumer=consumer,
            category=category,
            error=error,
            attempts=attempts,
            fields=fields,
        )
        new_id = await self._move(keys=[stream, self.keys.dlq, self.keys.deferrals], args=args)
        return new_id.decode() if new_id else None

    async def count(self) -> int:
        return int(await self.client.xlen(self.keys.dlq))

    async def list(
        self,
        *,
        category: str | None = None,
        since_ms: int | None = None,
        limit: int = 100,
        start: str = "-",
    ) -> list[DeadLetter]:
        """Dead letters oldest first, optionally filtered by category and failed-at time."""
        out: list[DeadLetter] = []
        cursor = f"{since_ms}-0" if since_ms is not None and start == "-" else start
        while len(out) < limit:
            raw = await self.client.xrange(
                self.keys.dlq, min=cursor, max="+", count=max(limit, 100)
            )
            entries = parse_entries(raw)
            if not entries:
                break
            for entry_id, fields in entries:
                letter = _from_entry(entry_id, fields)
                if category and letter.category != category:
                    continue
                out.append(letter)
                if len(out) >= limit:
                    break
            cursor = "(" + entries[-1][0]
        return out

    async def get(self, dlq_id: str) -> DeadLetter | None:
        raw = await self.client.xrange(self.keys.dlq, min=dlq_id, max=dlq_id)
        entries = parse_entries(raw)
        return _from_entry(*entries[0]) if entries else None

    async def redrive(self, dlq_ids: Iterable[str]) -> dict[str, str | None]:
        """Re-add each dead letter's original entry to its origin stream, at most once,
        with a fresh count: its ``attempt`` field is set to 0, so it gets its full
        ``max_deliveries`` again (the new entry has a new id, so no delivery or
        deferral of the old one follows it).

        Returns dead-letter id -> new entry id (None: unknown or already redriven).
        """
        result: dict[str, str | None] = {}
        allowed = set(self.keys.streams())
        for dlq_id in dlq_ids:
            letter = await self.get(dlq_id)
            too_many = letter is not None and len(letter.fields) > MAX_INLINE_FIELDS
            if letter is None or letter.origin not in allowed or too_many:
                result[dlq_id] = None
                continue
            args: list[bytes | str] = [dlq_id]
            for k, v in letter.fields.items():
                args += [k, b"0" if k == b"attempt" else v]
            new_id = await self._redrive(
                keys=[self.keys.dlq, self.keys.redriven, letter.origin], args=args
            )
            result[dlq_id] = new_id.decode() if new_id else None
        return result

    async def purge(self, dlq_ids: Iterable[str] | None = None) -> int:
        """Delete the given dead letters, or all of them when ``dlq_ids`` is None."""
        if dlq_ids is None:
            n = int(await self.client.xlen(self.keys.dlq))
            await self.client.xtrim(self.keys.dlq, maxlen=0, approximate=False)
            return n
        ids = list(dlq_ids)
        return int(await self.client.xdel(self.keys.dlq, *ids)) if ids else 0


def oldest_age_ms(entry_id: str, now_ms: int | None = None) -> int:
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return max(0, now - entry_ms(entry_id))
