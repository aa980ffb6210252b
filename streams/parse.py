"""Parse raw redis-py stream replies once into plain typed values."""

from __future__ import annotations

from typing import Any

from streams.message import Fields

Entry = tuple[str, Fields]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_entries(raw: Any) -> list[Entry]:
    """XRANGE / XCLAIM / one stream of XREADGROUP: [(id, {field: value})]; drops deleted (None)."""
    return [(_s(entry_id), fields) for entry_id, fields in raw or () if fields is not None]


def parse_read(raw: Any) -> dict[str, list[Entry]]:
    """XREADGROUP reply (RESP2 list or RESP3 dict) -> stream -> entries."""
    if not raw:
        return {}
    items = raw.items() if isinstance(raw, dict) else raw
    out: dict[str, list[Entry]] = {}
    for stream, entries in items:
        if isinstance(raw, dict):  # RESP3 wraps each stream's entries in one more list
            entries = entries[0] if entries else []
        out[_s(stream)] = [(_s(i), f) for i, f in entries if f is not None]
    return out


def entry_ms(entry_id: str) -> int:
    """The millisecond part of a stream id."""
    return int(entry_id.split("-", 1)[0])


def id_before(entry_id: str) -> str:
    """The greatest id strictly smaller than ``entry_id`` (for XGROUP SETID before a start)."""
    ms, _, seq = entry_id.partition("-")
    if seq and int(seq) > 0:
        return f"{ms}-{int(seq) - 1}"
    if int(ms) == 0:
        return "0-0"
    return f"{int(ms) - 1}-18446744073709551615"


def id_after(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


_MAX_PART = 2**64 - 1


def normalize_id(value: str) -> str:
    """Accept 'ms' or 'ms-seq'; raise ValueError with the bad value otherwise."""
    ms, sep, seq = value.partition("-")
    if not ms.isdigit() or (sep and not seq.isdigit()):
        raise ValueError(f"{value!r} is not a stream id (expected MS or MS-SEQ)")
    if int(ms) > _MAX_PART or (sep and int(seq) > _MAX_PART):
        raise ValueError(f"{value!r} is not a stream id (each part is at most {_MAX_PART})")
    return f"{int(ms)}-{int(seq) if sep else 0}"
