"""Pipeline settings (the runtime's own are :class:`streams.settings.StreamSettings`).

Both read ``TRACKSTREAM_*`` once, at the edge; library code takes them as arguments.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.settings import ENV_PREFIX, StreamSettings, config_error

DEFAULT_DATABASE_URL = "sqlite:///.trackstream/trackstream.db"


class AppSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL

    source: Literal["simulated", "http"] = "simulated"
    source_url: str | None = None
    source_api_key: str | None = None
    source_timeout_s: float = Field(10.0, gt=0)
    source_rate_per_s: float = Field(5.0, gt=0)  # batch calls per second
    source_burst: int = Field(5, ge=1)
    fleet_seed: int = 7

    geocoder: Literal["offline", "nominatim"] = "offline"
    geocoder_url: str | None = None
    geocoder_rate_per_s: float = Field(1.0, gt=0)
    geocoder_cache_size: int = Field(100_000, ge=0)

    breaker_failures: int = Field(5, ge=1)
    breaker_reset_s: float = Field(30.0, gt=0)
    source_retries: int = Field(3, ge=1)

    schedule_interval_s: float = Field(30.0, gt=0)
    min_fetch_interval_s: int = Field(300, ge=1)
    batch_trackers: int = Field(64, ge=1, le=64)
    max_batches_per_tick: int = Field(200, ge=1)

    view_refresh_interval_s: float = Field(10.0, ge=0)
    reconcile_grace_s: int = Field(300, ge=1)
    reconcile_interval_s: float = Field(60.0, gt=0)
    reconcile_max_republish: int = Field(3, ge=1)

    metrics_port: int | None = Field(None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 in a container, for Prometheus to reach
    dashboard_token: str | None = None

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        from sqlalchemy.exc import ArgumentError

        from schemas.db import normalize_url

        try:
            normalize_url(value)
        except ArgumentError:
            raise ValueError(
                "not a database URL: use sqlite:///path.db or postgresql+psycopg://user@host/db"
            ) from None
        return value

    @model_validator(mode="after")
    def _urls(self) -> Self:
        if self.source == "http" and not self.source_url:
            raise ValueError("source_url is required when source is 'http'")
        if self.geocoder == "nominatim" and not self.geocoder_url:
            raise ValueError("geocoder_url is required when geocoder is 'nominatim'")
        return self

    @classmethod
    def build(cls, **values: Any) -> Self:
        try:
            return cls(**values)
        except ValidationError as exc:
            raise config_error(exc, ENV_PREFIX) from None


def load(**overrides: Any) -> tuple[StreamSettings, AppSettings]:
    """Both settings objects from the environment plus explicit overrides (CLI flags)."""
    stream_fields = set(StreamSettings.model_fields)
    return (
        StreamSettings.build(**{k: v for k, v in overrides.items() if k in stream_fields}),
        AppSettings.build(**{k: v for k, v in overrides.items() if k not in stream_fields}),
    )
