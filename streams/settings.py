"""Runtime settings: one frozen object, built once, passed down.

Library code never reads the environment; :meth:`StreamSettings.from_env` does, once,
at the edge (CLI, worker entry point). Tests build settings directly.
"""

from __future__ import annotations

from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.errors import ConfigError
from streams.keys import check_name

ENV_PREFIX = "TRACKSTREAM_"


class StreamSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    prefix: str = "ts"

    batch_size: int = Field(100, ge=1, le=10_000)
    block_ms: int = Field(2_000, ge=1, le=60_000)
    concurrency: int = Field(16, ge=1, le=1_000)
    handler_timeout_ms: int = Field(30_000, ge=1)
    max_deliveries: int = Field(5, ge=1, le=1_000)
    # a stage whose handler mostly waits (Defer) and bounds its own attempts: a delivery
    # is spent only by a failure the handler returns, not by its consumer dying
    presume_waiting: bool = False
    retry_base_ms: int = Field(200, ge=0)
    retry_max_ms: int = Field(30_000, ge=0)

    claim_idle_ms: int = Field(60_000, ge=1)
    claim_interval_ms: int = Field(2_000, ge=10)
    claim_count: int = Field(100, ge=1, le=10_000)

    heartbeat_interval_ms: int = Field(2_000, ge=10)
    consumer_dead_after_ms: int = Field(8_000, ge=100)
    shutdown_grace_ms: int = Field(10_000, ge=0)
    max_message_bytes: int = Field(512 * 1024, ge=64)

    # automatic trimming (streams.trimmer): processed entries younger than
    # retention_ms stay (for replay and trace); trim_interval_ms = 0 turns it off
    retention_ms: int = Field(3_600_000, ge=0)
    trim_interval_ms: int = Field(60_000, ge=0)

    connect_retries: int = Field(6, ge=0, le=100)
    connect_backoff_base_ms: int = Field(100, ge=1)
    connect_backoff_max_ms: int = Field(5_000, ge=1)
    socket_timeout_ms: int = Field(10_000, ge=100)
    connect_timeout_ms: int = Field(3_000, ge=100, le=60_000)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        check_name("prefix", self.prefix)
        seeds = seed_urls(self.redis_url)  # raises naming redis_url
        if len(seeds) > 1 and not self.redis_cluster:
            raise ValueError(
                "redis_url lists several nodes; that is only for a cluster (set redis_cluster)"
            )
        if self.claim_idle_ms <= self.handler_timeout_ms:
            raise ValueError(
                "claim_idle_ms must be greater than handler_timeout_ms, or entries still being "
                "handled would be claimed by another consumer"
            )
        if self.heartbeat_interval_ms * 2 > self.consumer_dead_after_ms:
            raise ValueError("consumer_dead_after_ms must be at least 2 x heartbeat_interval_ms")
        if self.retry_max_ms < self.retry_base_ms:
            raise ValueError("retry_max_ms must be >= retry_base_ms")
        return self

    @classmethod
    def build(cls, **values: Any) -> Self:
        """Build from explicit values (and the environment), naming the bad setting."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise config_error(exc, ENV_PREFIX) from None

    def with_(self, **changes: Any) -> Self:
        return type(self).build(**{**self.model_dump(), **changes})


def seed_urls(value: str) -> list[str]:
    """The comma-separated seed nodes of ``redis_url`` as full URLs.

    ``redis://:pw@a:6379,b:6379`` and ``redis://:pw@a:6379,redis://:pw@b:6379`` are the
    same: a bare ``host:port`` takes scheme, credentials, path and query of the first.
    """
    parts = [p.strip() for p in value.split(",")]
    if not parts or not parts[0]:
        raise ValueError("redis_url is empty")
    first = parts[0]
    if not first.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(
            f"redis_url must start with redis://, rediss:// or unix:// (got {_shown(first)!r})"
        )
    urls = [first]
    head = urlsplit(first)
    for part in parts[1:]:
        if not part:
            raise ValueError("redis_url has an empty entry between commas")
        if "://" in part:
            if not part.startswith(("redis://", "rediss://")):
                raise ValueError(f"redis_url seed {_shown(part)!r} must be redis:// or rediss://")
            urls.append(part)
            continue
        creds = head.netloc.rpartition("@")[0]
        netloc = f"{creds}@{part}" if creds else part
        urls.append(urlunsplit(head._replace(netloc=netloc)))
    for url in urls:
        if url.startswith("unix://"):
            continue
        parts_ = urlsplit(url)
        try:
            port = parts_.port
        except ValueError:
            raise ValueError(f"redis_url seed {_shown(url)!r} has a bad port") from None
        if not parts_.hostname:
            raise ValueError(f"redis_url seed {_shown(url)!r} has no host")
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"redis_url seed {_shown(url)!r} has a bad port")
    return urls


def _shown(url: str) -> str:
    """A URL for an error message: the password replaced."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.partition(":")[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


def config_error(exc: ValidationError, env_prefix: str) -> ConfigError:
    err = exc.errors()[0]
    loc = [str(part) for part in err.get("loc", ())]
    name = loc[0] if loc else ""
    msg = str(err.get("msg", "invalid"))
    if name:
        setting = f"{name} ({env_prefix}{name.upper()})"
        return ConfigError(setting, f"{msg} (got {err.get('input')!r})")
    # a model-level check: its message starts with the setting's name
    msg = msg.removeprefix("Value error, ")
    name = msg.split(" ")[0]
    return ConfigError(f"{name} ({env_prefix}{name.upper()})", msg)
