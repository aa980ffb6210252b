"""What the consumer's parts share: one value built by the consumer and handed to
:class:`~streams.claiming.Claimer` and :class:`~streams.settle.Settler`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from streams.connection import Client
from streams.hooks import Hooks
from streams.keys import StageKeys
from streams.retries import RetrySchedule
from streams.settings import StreamSettings


@dataclass(frozen=True, slots=True)
class Shared:
    client: Client
    settings: StreamSettings
    keys: StageKeys
    name: str  # the consumer name
    hooks: Hooks
    retries: RetrySchedule
    stop: asyncio.Event

    @property
    def stage(self) -> str:
        return self.keys.stage
