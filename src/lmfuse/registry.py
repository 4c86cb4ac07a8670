"""Name → plugin registries for fusion functions, align and vocab-map methods, baselines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from lmfuse.errors import LmfuseError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of plugins chosen by name in the config."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise LmfuseError(
                f"unknown {self.kind} {name!r}",
                fix=f"choose one of: {', '.join(sorted(self._items))}",
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
