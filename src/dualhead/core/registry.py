"""One small registry helper: things found by name (balancers, tasks, architectures, fusions, datasets).

    FUSIONS = Registry("fusion")

    @FUSIONS.register("attention")
    class AttentionFusion(nn.Module): ...

    FUSIONS.build("attention", dim=256)  # or FUSIONS.lookup("attention") for the class itself
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Name -> constructor, filled by the `register` decorator; unknown names give a clear error."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None, obj: T | None = None) -> Any:
        """Register `obj` under `name` (default: its ``__name__``); without `obj`, a decorator."""

        def add(item: T) -> T:
            key = name or getattr(item, "__name__", None)
            if not key:
                raise ValueError(f"a {self.kind} needs a name to be registered")
            if key in self._entries and self._entries[key] is not item:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = item
            return item

        return add(obj) if obj is not None else add

    def lookup(self, name: str) -> T:
        """The entry registered as `name`, or a ValueError listing the known names."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(sorted(self._entries))}") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the constructor registered as `name`."""
        constructor: Callable[..., Any] = self.lookup(name)  # type: ignore[assignment]
        return constructor(*args, **kwargs)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __setitem__(self, name: str, item: T) -> None:
        self.register(name, item)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"
