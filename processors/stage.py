"""What a stage is to the pipeline, and the registry that names them.

A stage is a class holding its dependencies and domain logic only; it handles its input
one message at a time (:class:`SingleStage`) or a batch at a time (:class:`BatchStage`).
A stage may also have

- ``batch_size`` (:class:`SizedBatches`): the entries per read it prefers (None: no
  preference), unless ``TRACKSTREAM_BATCH_SIZE`` is set;
- ``ready()`` (:class:`Gated`): awaited before each read, after the database gate
  (its source's circuit, loading its data);
- ``aclose()`` (:class:`Closable`): awaited when the pipeline closes.

:class:`StageRegistry` maps each stage's name to a :class:`StageSpec`: the one event
type it consumes (anything else is rejected as poison) and how it is built from a
pipeline's dependencies. ``processors.pipeline.STAGES`` is the registry the pipeline and
the CLI look stages up in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeAlias, TypeVar, runtime_checkable

from streams.consumer import Context
from streams.message import Message

__all__ = [
    "BatchStage",
    "Closable",
    "Gated",
    "SingleStage",
    "SizedBatches",
    "Stage",
    "StageRegistry",
    "StageSpec",
]

Deps = TypeVar("Deps")


@runtime_checkable
class SingleStage(Protocol):
    async def handle(self, msg: Message[Any], ctx: Context) -> None: ...


@runtime_checkable
class BatchStage(Protocol):
    async def handle_batch(
        self, msgs: Sequence[Message[Any]], ctx: Context
    ) -> Mapping[str, BaseException] | None:
        """Failures by entry id; the entries not named succeeded."""
        ...


Stage: TypeAlias = SingleStage | BatchStage


@runtime_checkable
class SizedBatches(Protocol):
    batch_size: int | None  # None: the settings' batch size


@runtime_checkable
class Gated(Protocol):
    async def ready(self) -> None: ...


@runtime_checkable
class Closable(Protocol):
    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class StageSpec(Generic[Deps]):
    """A stage's name, the event type it consumes, and its factory."""

    name: str
    input_type: type
    build: Callable[[Deps], Stage]


class StageRegistry(Generic[Deps]):
    """The stages by name, in pipeline order."""

    def __init__(self, specs: Sequence[StageSpec[Deps]]) -> None:
        self._specs = {s.name: s for s in specs}

    def get(self, name: str) -> StageSpec[Deps]:
        """The stage's spec; ValueError naming the stages for an unknown name."""
        try:
            return self._specs[name]
        except KeyError:
            raise ValueError(
                f"unknown stage {name!r}; stages are: {', '.join(self._specs)}"
            ) from None

    def build(self, name: str, deps: Deps) -> Stage:
        stage = self.get(name).build(deps)
        if not isinstance(stage, SingleStage | BatchStage):
            raise TypeError(f"stage {name!r} has neither handle() nor handle_batch()")
        return stage

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def __iter__(self) -> Iterator[StageSpec[Deps]]:
        return iter(self._specs.values())
