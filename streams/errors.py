"""The exceptions of the streams runtime.

::

    StreamsError
    ├── ConfigError                 a setting is invalid (names the setting)
    ├── RedisUnavailable            connection refused/reset/timed out (URL shown without password)
    ├── GroupMissing                NOGROUP: the consumer group or stream vanished
    ├── RedisCommandError(reply)    Redis refused the command: WRONGTYPE, a syntax error,
    │   │                           BUSYGROUP, NOSCRIPT... (a bug, or an expected refusal)
    │   └── NoSuchKey               the key does not exist (XINFO on a missing stream)
    ├── RateLimited(retry_after_s)  a shared rate limit has no slot soon enough
    ├── MessageError                an entry that can never be handled -> dead letter at once
    │   ├── DecodeError             not an envelope, bad JSON, unknown type     (category "decode")
    │   ├── PayloadInvalid          the payload fails validation            (category "validation")
    │   └── MessageTooLarge         encoded payload over ``max_message_bytes`` (raised on publish)
    └── HandlerSignal               raised by handlers to steer what happens next
        ├── Retry(delay_ms)         transient: redeliver after ``delay_ms`` (counts a delivery)
        │   └── Defer(delay_ms)     could not even try (a dependency's circuit is open):
        │                           redeliver after ``delay_ms``, no delivery counted
        └── Reject(reason)          permanent: dead-letter now              (category "handler")

Any other exception from a handler is transient: retried with backoff until
``max_deliveries``, then dead-lettered with category "max-deliveries" (or "timeout"
when the last attempt timed out). Redis driver errors are translated to these at one
boundary, inside the client :func:`streams.connection.connect` returns (every command
and pipeline), after :func:`streams.faults.classify` sorted them (transient, group
missing, bug): callers never see a redis-py exception.
"""

from __future__ import annotations


class StreamsError(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(StreamsError, ValueError):
    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"setting {setting}: {problem}")
        self.setting = setting


class RedisUnavailable(StreamsError):
    def __init__(self, url: str, cause: BaseException) -> None:
        text = " ".join(str(cause).split()) or type(cause).__name__
        super().__init__(f"Redis at {url} is unavailable: {text[:400]}")
        self.url = url


class GroupMissing(StreamsError):
    def __init__(self, stream: str, group: str) -> None:
        super().__init__(f"consumer group {group!r} on {stream!r} does not exist")
        self.stream = stream
        self.group = group


class RedisCommandError(StreamsError):
    """Redis answered the command with an error reply (``reply``), or the driver
    refused it; the redis-py exception is its ``__cause__``."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class NoSuchKey(RedisCommandError):
    """The command needs a key that does not exist."""


class RateLimited(StreamsError):
    def __init__(self, key: str, retry_after_s: float) -> None:
        super().__init__(f"rate limit {key!r}: next slot in {retry_after_s:.2f} s")
        self.retry_after_s = retry_after_s


class MessageError(StreamsError):
    category = "decode"


class DecodeError(MessageError):
    category = "decode"


class PayloadInvalid(MessageError):
    category = "validation"


class MessageTooLarge(MessageError):
    category = "validation"


class HandlerSignal(Exception):
    """Control flow for handlers; not an error of the runtime."""


class Retry(HandlerSignal):
    def __init__(self, reason: str = "retry requested", delay_ms: int | None = None) -> None:
        super().__init__(reason)
        self.delay_ms = delay_ms


class Defer(Retry):
    """The handler did not get to try (its dependency is known to be down), so this
    says nothing about the message: it is redelivered without counting a delivery.
    Pair it with a worker gate that holds reads while the dependency is down."""


class Reject(HandlerSignal):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
