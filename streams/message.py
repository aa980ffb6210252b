"""The envelope around every payload, and the codec that writes and reads it.

A stream entry has these fields (readable in ``redis-cli``)::

    type      payload type name, e.g. "location.reported"
    v         payload schema version (int)
    msg_id    unique id of the message (survives copies, replays and redrives)
    produced  produced-at, unix ms
    attempt   deliveries spent before it was handed back and re-queued (0 at first;
              a redrive starts it at 0 again)
    trace     optional trace id carried from message to message
    data      the payload as JSON (orjson / pydantic-core)

Reading is strict: ``v`` must be 1..the reader's ``VERSION``, ``attempt`` 0..1,000,000,
and the whole entry at most ``max_bytes`` + 4 KiB (room for the envelope) in at most
100 fields. Any
failure while decoding or validating, whatever its exception (an ``OverflowError``
from a date converted to UTC, a ``RecursionError``...), is a
:class:`~streams.errors.MessageError`: the entry is dead-lettered, never a crash.

Payload classes are pydantic models with class variables ``TYPE`` and ``VERSION``.
A reader accepts versions up to its own ``VERSION``; a model may define
``upgrade(data: dict, from_version: int) -> dict`` to read older ones.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from streams.errors import DecodeError, MessageError, MessageTooLarge, PayloadInvalid

Fields = dict[bytes, bytes]
P = TypeVar("P", bound=BaseModel)


class Payload(Protocol):
    TYPE: ClassVar[str]
    VERSION: ClassVar[int]


@dataclass(frozen=True, slots=True)
class Envelope(Generic[P]):
    type: str
    version: int
    msg_id: str
    produced_ms: int
    attempt: int
    trace: str | None
    payload: P


@dataclass(slots=True)
class Message(Generic[P]):
    """One delivered entry: where it came from, how often it was delivered, what it says.

    ``deliveries`` counts the deliveries that were spent (this one included while it
    runs); ``deferrals`` those that ended in a deferral, which spend nothing. Redis's
    own count (XPENDING's times_delivered) is their sum (see :mod:`streams.keys`)."""

    stream: str
    entry_id: str
    fields: Fields
    deliveries: int
    envelope: Envelope[P] | None = None
    error: Exception | None = field(default=None, repr=False)
    deferrals: int = 0
    presumed: bool = False  # this delivery is counted as a deferral until it fails

    @property
    def payload(self) -> P:
        assert self.envelope is not None, "payload of an undecodable message"
        return self.envelope.payload

    @property
    def times_delivered(self) -> int:
        """Redis's delivery count of the entry."""
        return self.deliveries + self.deferrals

    @property
    def attempts(self) -> int:
        """Deliveries spent in this stream plus those spent before earlier hand-backs."""
        return self.deliveries + (self.envelope.attempt if self.envelope else 0)

    def deferred(self) -> None:
        """This delivery ended in a deferral: it is not spent."""
        self.deliveries -= 1
        self.deferrals += 1

    def spent(self) -> None:
        """A delivery presumed a deferral failed after all: it is spent."""
        self.deliveries += 1
        self.deferrals -= 1
        self.presumed = False


def _text(fields: Mapping[bytes, bytes], name: bytes) -> str:
    value = fields.get(name)
    if value is None:
        raise DecodeError(f"field {name.decode()!r} is missing")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise DecodeError(f"field {name.decode()!r} is not UTF-8") from None


def _int(
    fields: Mapping[bytes, bytes],
    name: bytes,
    default: int | None = None,
    *,
    low: int | None = None,
    high: int | None = None,
) -> int:
    if default is not None and name not in fields:
        return default
    raw = _text(fields, name)
    try:
        value = int(raw)
    except ValueError:
        raise DecodeError(f"field {name.decode()!r} is not an integer: {raw[:40]!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise DecodeError(f"field {name.decode()!r} is {value}, outside {low}..{high}")
    return value


ENVELOPE_ROOM = 4096  # bytes an entry may have beyond its payload when read
MAX_ATTEMPT = 1_000_000
MAX_FIELDS = 100  # an envelope has 7; more is not an entry of ours


def entry_size(fields: Mapping[bytes, bytes]) -> int:
    return sum(map(len, fields)) + sum(map(len, fields.values()))


class Codec:
    """Encodes payloads into entry fields and decodes them back, by registered type."""

    def __init__(self, models: Iterable[type[BaseModel]] = (), max_bytes: int = 512 * 1024):
        self.max_bytes = max_bytes
        self._models: dict[str, type[BaseModel]] = {}
        self._fast: dict[bytes, tuple[str, type[BaseModel], bytes, int, Any]] = {}
        for model in models:
            self.register(model)

    def register(self, model: type[BaseModel]) -> None:
        type_name = getattr(model, "TYPE", None)
        version = getattr(model, "VERSION", None)
        if not isinstance(type_name, str) or not isinstance(version, int) or version < 1:
            raise TypeError(
                f"{model.__name__} needs class variables TYPE: str and VERSION: int >= 1"
            )
        self._models[type_name] = model
        # decode's fast path: the latest version, validated without pydantic's wrapper
        self._fast[type_name.encode()] = (
            type_name,
            model,
            b"%d" % version,
            version,
            model.__pydantic_validator__.validate_json,
        )

    def types(self) -> list[str]:
        return sorted(self._models)

    def encode(
        self,
        payload: BaseModel,
        *,
        trace: str | None = None,
        attempt: int = 0,
        msg_id: str | None = None,
    ) -> Fields:
        data = payload.__pydantic_serializer__.to_json(payload)
        if len(data) > self.max_bytes:
            raise MessageTooLarge(
                f"{type(payload).__name__} payload is {len(data)} bytes; max_message_bytes is "
                f"{self.max_bytes}"
            )
        fields: Fields = {
            b"type": payload.TYPE.encode(),  # type: ignore[attr-defined]
            b"v": b"%d" % payload.VERSION,  # type: ignore[attr-defined]
            b"msg_id": msg_id.encode() if msg_id else new_msg_id(),
            b"produced": b"%d" % (time.time_ns() // 1_000_000),
            b"attempt": b"%d" % attempt,
            b"data": data,
        }
        if trace:
            fields[b"trace"] = trace.encode()
        return fields

    def decode(self, fields: Mapping[bytes, bytes]) -> Envelope[Any]:
        """The envelope of an entry; any problem with it raises a MessageError."""
        if len(fields) > MAX_FIELDS:
            raise MessageTooLarge(
                f"entry has {len(fields)} fields; an envelope has at most {MAX_FIELDS}"
            )
        size = entry_size(fields)
        if size > self.max_bytes + ENVELOPE_ROOM:
            raise MessageTooLarge(
                f"entry is {size} bytes; max_message_bytes is {self.max_bytes} "
                f"(+{ENVELOPE_ROOM} for the envelope)"
            )
        try:  # the common case without per-field checks; errors take the careful path
            fast = self._fast.get(fields[b"type"])
            if fast is not None and fields[b"v"] == fast[2]:
                name, model, _, version, validate = fast
                raw_attempt = fields.get(b"attempt", b"0")
                attempt = 0 if raw_attempt == b"0" else int(raw_attempt)
                if 0 <= attempt <= MAX_ATTEMPT:
                    trace = fields.get(b"trace")
                    return Envelope(
                        name,
                        version,
                        fields[b"msg_id"].decode(),
                        int(fields.get(b"produced", 0)),
                        attempt,
                        trace.decode(errors="replace") if trace else None,
                        validate(fields[b"data"]),
                    )
            type_name = fields[b"type"].decode()
            model = self._models[type_name]
            version = int(fields[b"v"])
            attempt = int(fields.get(b"attempt", 0))
            if version == model.VERSION and 0 <= attempt <= MAX_ATTEMPT:  # type: ignore[attr-defined]
                trace = fields.get(b"trace")
                return Envelope(
                    type=type_name,
                    version=version,
                    msg_id=fields[b"msg_id"].decode(),
                    produced_ms=int(fields.get(b"produced", 0)),
                    attempt=attempt,
                    trace=trace.decode(errors="replace") if trace else None,
                    payload=model.model_validate_json(fields[b"data"]),
                )
        except Exception:  # reported precisely by the careful path
            pass
        try:
            return self._decode_carefully(fields)
        except MessageError:
            raise
        except Exception as exc:  # a bug or a limit hit outside the payload's validation
            raise DecodeError(f"undecodable entry: {type(exc).__name__}: {exc}") from None

    def _decode_carefully(self, fields: Mapping[bytes, bytes]) -> Envelope[Any]:
        type_name = _text(fields, b"type")
        model = self._models.get(type_name)
        if model is None:
            raise DecodeError(
                f"unknown message type {type_name!r}; known: {', '.join(self.types())}"
            )
        latest: int = model.VERSION  # type: ignore[attr-defined]
        version = _int(fields, b"v", low=1)
        if version > latest:
            raise DecodeError(f"{type_name} version {version} is newer than supported {latest}")
        attempt = _int(fields, b"attempt", 0, low=0, high=MAX_ATTEMPT)
        msg_id = _text(fields, b"msg_id")
        produced_ms = _int(fields, b"produced", 0)
        data = fields.get(b"data")
        if data is None:
            raise DecodeError("field 'data' is missing")
        try:
            if version == latest:
                payload = model.model_validate_json(data)
            else:
                raw = orjson.loads(data)
                upgrade = getattr(model, "upgrade", None)
                if upgrade is not None:
                    raw = upgrade(raw, version)
                payload = model.model_validate(raw)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"payload is not JSON: {exc}") from None
        except ValidationError as exc:
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                raise DecodeError(f"payload is not JSON: {exc.errors()[0]['msg']}") from None
            raise PayloadInvalid(f"{type_name}: {_short(exc)}") from None
        except Exception as exc:  # e.g. OverflowError from a validator: still this payload's fault
            raise PayloadInvalid(f"{type_name}: {type(exc).__name__}: {exc}") from None
        trace = fields.get(b"trace")
        return Envelope(
            type=type_name,
            version=version,
            msg_id=msg_id,
            produced_ms=produced_ms,
            attempt=attempt,
            trace=trace.decode(errors="replace") if trace else None,
            payload=payload,
        )


_ID_PREFIX = secrets.token_hex(6).encode()
_ID_COUNTER = itertools.count()


def new_msg_id() -> bytes:
    """A message id unique across processes: 48 random bits per process + a counter."""
    return b"%s%x" % (_ID_PREFIX, next(_ID_COUNTER))


def _short(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - 3
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
