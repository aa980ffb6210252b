"""Pipeline settings (the runtime's own are :class:`streams.settings.StreamSettings`).

Both read ``TRACKSTREAM_*`` once, at the edge; library code takes them as arguments.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
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
    # the lateness bound: each call asks for the reports observed after the tracker's
    # cursor less this, so a report delivered up to this late is still stored
    source_lateness_s: int = Field(3600, ge=0, le=7 * 86_400)
    fleet_seed: int = 7
    fleet_messy: bool = False  # the simulated fleet sends realistic trouble (sources.Trouble)

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
    # the scheduler's backpressure: fetch requests outstanding at most what the rate
    # limit fetches in this many seconds (unset: min_fetch_interval_s)
    fetch_backlog_s: float | None = Field(None, gt=0)
    max_tracker_age_s: int = Field(43_200, ge=1)  # the freshness guarantee (12 h)

    # position quality before geofencing (processors.crossings.Rules), and hysteresis
    fix_max_accuracy_m: float = Field(500.0, gt=0)
    fix_max_speed_kmh: float = Field(300.0, ge=0)  # 0: no speed filter
    fix_future_tolerance_s: float = Field(300.0, ge=0)
    fix_reject_zero: bool = True
    fix_reject_duplicates: bool = True
    geofence_margin_m: float = Field(30.0, ge=0, le=10_000)
    geofence_use_accuracy: bool = True

    view_refresh_interval_s: float = Field(10.0, ge=0)
    reconcile_grace_s: int = Field(300, ge=1)
    reconcile_interval_s: float = Field(60.0, gt=0)
    reconcile_max_republish: int = Field(3, ge=1)
    # reports, events and the webhook log older than this are dropped (None: kept)
    history_retention_days: int | None = Field(None, ge=1)

    # notify: webhook delivery (see processors/stages/notify.py)
    notify_rate_per_min: float = Field(20.0, gt=0)  # per endpoint, all workers together
    notify_timeout_s: float = Field(10.0, gt=0)
    notify_max_attempts: int = Field(10, ge=1, le=100)
    notify_retry_base_s: float = Field(2.0, gt=0)
    notify_retry_max_s: float = Field(300.0, gt=0)
    notify_endpoint_concurrency: int = Field(4, ge=1, le=100)  # per endpoint and worker
    notify_breaker_failures: int = Field(5, ge=1)
    notify_breaker_reset_s: float = Field(30.0, gt=0)
    notify_order_wait_s: float = Field(600.0, gt=0)
    notify_max_rate_wait_s: float = Field(10.0, ge=0)
    notify_inline_wait_s: float = Field(0.5, ge=0)
    notify_poll_s: float = Field(0.25, gt=0)
    # webhook secrets at rest: Fernet keys, newest first (comma-separated), or a file
    # with one key a line; see schemas/secretbox.py and `trackstream webhook rotate-key`
    webhook_keys: SecretStr | None = None
    webhook_key_file: str | None = None

    metrics_port: int | None = Field(None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 in a container, for Prometheus to reach
    dashboard_token: str | None = None
    # the dashboard's read-only pages and API need this token when set (or the one above)
    dashboard_read_token: str | None = None
    # the map's base tiles (like https://tile.openstreetmap.org/{z}/{x}/{y}.png); none:
    # a plain background with the geofences, tracks and trackers drawn on it
    map_tiles_url: str | None = None
    map_tiles_attribution: str = ""

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

    @field_validator("map_tiles_url")
    @classmethod
    def _tiles(cls, value: str | None) -> str | None:
        if value and not (
            value.startswith(("http://", "https://")) and "{z}" in value and "{x}" in value
        ):
            raise ValueError("must be an http(s) URL template with {z}, {x} and {y}")
        return value or None

    @model_validator(mode="after")
    def _urls(self) -> Self:
        if self.source == "http" and not self.source_url:
            raise ValueError("source_url is required when source is 'http'")
        if self.geocoder == "nominatim" and not self.geocoder_url:
            raise ValueError("geocoder_url is required when geocoder is 'nominatim'")
        if self.max_tracker_age_s <= self.min_fetch_interval_s:
            raise ValueError(
                "max_tracker_age_s must be greater than min_fetch_interval_s "
                f"({self.max_tracker_age_s} <= {self.min_fetch_interval_s})"
            )
        if self.fetch_backlog_s is not None and not (
            self.schedule_interval_s <= self.fetch_backlog_s <= self.min_fetch_interval_s
        ):
            raise ValueError(
                "fetch_backlog_s must lie between schedule_interval_s and min_fetch_interval_s "
                f"(got {self.fetch_backlog_s:g}, not in {self.schedule_interval_s:g}.."
                f"{self.min_fetch_interval_s}): shorter starves the fetch stage between "
                "ticks, longer lets requests outlive their reservations"
            )
        if self.notify_retry_max_s < self.notify_retry_base_s:
            raise ValueError("notify_retry_max_s must be >= notify_retry_base_s")
        return self

    def webhook_key_list(self) -> list[str]:
        """The Fernet keys for webhook secrets, newest first (none configured: [])."""
        keys = self.webhook_keys.get_secret_value().split(",") if self.webhook_keys else []
        if self.webhook_key_file:
            from pathlib import Path

            try:
                text = Path(self.webhook_key_file).read_text()
            except OSError as exc:
                raise ValueError(f"webhook_key_file: cannot read it ({exc.strerror})") from None
            keys += text.split()
        return [k.strip() for k in keys if k.strip()]

    @property
    def fetch_backlog_bound_s(self) -> float:
        """The fetch backlog bound in seconds of fetching (default: the interval)."""
        if self.fetch_backlog_s is None:
            return float(self.min_fetch_interval_s)
        return self.fetch_backlog_s

    def geofence_rules(self) -> Any:
        """The position-quality and hysteresis rules (:class:`processors.crossings.Rules`)."""
        from processors.crossings import Rules

        return Rules(
            margin_m=self.geofence_margin_m,
            use_accuracy=self.geofence_use_accuracy,
            max_accuracy_m=self.fix_max_accuracy_m,
            max_speed_kmh=self.fix_max_speed_kmh or None,
            future_tolerance_s=self.fix_future_tolerance_s,
            reject_zero=self.fix_reject_zero,
            reject_duplicates=self.fix_reject_duplicates,
        )

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
